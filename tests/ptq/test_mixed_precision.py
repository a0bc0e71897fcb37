"""Importances of mixed precision on a constructed model: the layer holding more information
(or hurting the loss more when rounded alone) gets more bits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efqat_jax.nn import QuantRule, quantize, quantized_layers
from efqat_jax.ptq.bit_allocation import allocate_bits, memory_bits
from efqat_jax.ptq.mixed_precision import (
  coding_length_importance,
  layer_sizes,
  sensitivity_importance,
)
from efqat_jax.quant import QuantSpec


class TwoLayers(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(32, name="second")(nn.Dense(32, name="first")(x))


def two_layer_model():
  model = quantize(TwoLayers(), QuantRule(".*", QuantSpec.for_weights(4), None))
  x = jnp.ones((4, 32))
  variables = model.init(jax.random.key(0), x)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: a, variables["params"])
  # "first": rank 1 (little to code); "second": a full-rank random matrix of the same size.
  params["first"]["kernel"] = jnp.asarray(
    np.outer(rng.standard_normal(32), rng.standard_normal(32))
  )
  params["second"]["kernel"] = jnp.asarray(rng.standard_normal((32, 32)))
  return model, params, quantized_layers(model, variables, x), x


def test_the_layer_with_the_larger_coding_length_gets_more_bits():
  _, params, layers, _ = two_layer_model()
  importance = coding_length_importance(params, layers, 0.1)
  assert importance["second"] > 2 * importance["first"] > 0
  sizes = layer_sizes(layers)
  bits = allocate_bits(importance, sizes, (2, 3, 4, 5, 6), budget_bits=4)
  assert bits["second"] > bits["first"]
  assert memory_bits(bits, sizes) <= 4 * sum(sizes.values())


def test_sensitivity_is_the_loss_increase_of_each_layer_rounded_alone():
  model, params, layers, x = two_layer_model()
  float_model = TwoLayers()
  target = float_model.apply({"params": params}, x)
  loss = lambda p: float(jnp.mean(jnp.square(float_model.apply({"params": p}, x) - target)))
  importance = sensitivity_importance(loss, params, layers, probe_bits=2, estimator="minmax")
  assert set(importance) == {"first", "second"} and min(importance.values()) > 0
  # Each is exactly that layer's rounding at 2 bits, the other left in float.
  scale = jnp.max(jnp.abs(params["second"]["kernel"]), axis=0) / 1  # 2-bit narrow: qmax 1
  rounded = jnp.clip(jnp.round(params["second"]["kernel"] / scale), -1, 1) * scale
  alone = {**params, "second": {**params["second"], "kernel": rounded}}
  np.testing.assert_allclose(importance["second"], loss(alone), rtol=1e-4)
