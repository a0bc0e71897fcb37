"""quantize(model, rules) on models written with plain Flax layers."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import efqat_jax
from efqat_jax.models import SmallCNN, Transformer
from efqat_jax.nn import Mode, QuantDense, QuantRule, quantize
from efqat_jax.quant import QuantSpec

W4, A4 = QuantSpec.for_weights(4), QuantSpec.for_activations(4)
W8, A8 = QuantSpec.for_weights(8), QuantSpec.for_activations(8)
KEY = jax.random.key(0)
QUANT_PARAMS = {"kernel_scale", "input_scale", "input_zero_point"}


class MLPBlock(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(x.shape[-1])(nn.relu(nn.Dense(self.width)(x)))


class NestedMLP(nn.Module):
  """Submodules defined inline with nn.compact, two levels deep."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16)(x)
    for _ in range(2):
      x = MLPBlock(32)(x)
    return nn.Dense(3)(x)


IMAGES = jax.random.normal(jax.random.key(1), (2, 12, 12, 1))
FEATURES = jax.random.normal(jax.random.key(2), (4, 8))
TOKENS = jax.random.randint(jax.random.key(3), (2, 10), 0, 32)

MODELS = {
  "cnn": (SmallCNN(num_classes=10, features=(8, 16)), IMAGES),
  "nested": (NestedMLP(), FEATURES),
  "attention": (
    Transformer(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32, max_len=16),
    TOKENS,
  ),
}
ALL_W4A4 = QuantRule(".*", weight=W4, input=A4)


def _quantized_layer_paths(params):
  return {"/".join(path[:-1]) for path in flatten_dict(params) if path[-1] == "kernel_scale"}


@pytest.mark.parametrize("name", MODELS)
def test_params_are_original_params_plus_quantization_params(name):
  model, x = MODELS[name]
  float_params = flatten_dict(model.init(KEY, x)["params"])
  quant_params = flatten_dict(quantize(model, ALL_W4A4).init(KEY, x)["params"])
  extra = {k for k in quant_params if k not in float_params}
  assert {k[-1] for k in extra} == QUANT_PARAMS
  for k, v in float_params.items():
    np.testing.assert_array_equal(quant_params[k], v, err_msg=str(k))


@pytest.mark.parametrize("name", MODELS)
def test_float_mode_reproduces_original_model(name):
  model, x = MODELS[name]
  qmodel = quantize(model, ALL_W4A4)
  variables = qmodel.init(KEY, x)
  float_out = model.apply({"params": model.init(KEY, x)["params"]}, x)
  chex.assert_trees_all_close(qmodel.clone(mode=Mode.FLOAT).apply(variables, x), float_out)
  quant_out = qmodel.apply(variables, x)
  assert quant_out.shape == float_out.shape
  assert not np.allclose(quant_out, float_out, atol=1e-4)


def test_every_dense_conv_and_dense_general_is_intercepted():
  model, x = MODELS["attention"]
  params = quantize(model, ALL_W4A4).init(KEY, x)["params"]
  attention = {
    f"TransformerBlock_{i}/MultiHeadDotProductAttention_0/{p}"
    for i in range(2)
    for p in ("query", "key", "value", "out")
  }
  dense = {f"TransformerBlock_{i}/Dense_{j}" for i in range(2) for j in range(2)}
  assert _quantized_layer_paths(params) == attention | dense | {"Dense_0"}
  cnn, images = MODELS["cnn"]
  assert _quantized_layer_paths(quantize(cnn, ALL_W4A4).init(KEY, images)["params"]) == {
    "Conv_0",
    "Conv_1",
    "Dense_0",
  }


def test_intercepted_layer_computes_like_native_quant_layer():
  class OneDense(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(6)(x)

  qmodel = quantize(OneDense(), ALL_W4A4)
  variables = qmodel.init(KEY, FEATURES)
  native = QuantDense(6, weight_spec=W4, input_spec=A4)
  native_vars = {c: variables[c]["Dense_0"] for c in variables}
  chex.assert_trees_all_close(
    qmodel.apply(variables, FEATURES), native.apply(native_vars, FEATURES), rtol=1e-6
  )


def test_first_matching_rule_wins_and_keep_float_leaves_layer_in_float():
  model, x = MODELS["nested"]
  rules = [
    QuantRule.keep_float("Dense_0|Dense_1"),
    QuantRule("MLPBlock_0/.*", weight=W8, input=None),
    QuantRule(".*", weight=W4, input=A4),
  ]
  params = quantize(model, rules).init(KEY, x)["params"]
  assert "kernel_scale" not in params["Dense_0"] and "kernel_scale" not in params["Dense_1"]
  assert set(params["MLPBlock_0"]["Dense_0"]) == {"kernel", "bias", "kernel_scale"}
  assert set(params["MLPBlock_1"]["Dense_1"]) >= QUANT_PARAMS


def test_rule_matching_no_layer_raises_naming_it():
  model, x = MODELS["cnn"]
  rules = [QuantRule("Conv_9", weight=W4, input=A4), ALL_W4A4]
  with pytest.raises(ValueError, match="Conv_9"):
    quantize(model, rules).init(KEY, x)


def test_invalid_rules_raise():
  with pytest.raises(ValueError, match="module_path"):
    QuantRule("Dense_(", weight=W4, input=A4)
  with pytest.raises(ValueError, match="QuantRule"):
    quantize(SmallCNN(), [("Dense_0", W4)])


def test_quantized_model_composes_into_a_larger_model_under_jit_and_grad():
  class Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(8)(x)  # outside the quantized part: stays float
      return quantize(NestedMLP(), ALL_W4A4)(x)

  variables = Outer().init(KEY, FEATURES)
  params = variables["params"]
  assert "kernel_scale" not in params["Dense_0"]
  assert _quantized_layer_paths(params) and all(
    p.startswith("NestedMLP_0/") for p in _quantized_layer_paths(params)
  )
  loss = jax.jit(jax.grad(lambda p: jnp.sum(Outer().apply({"params": p}, FEATURES) ** 2)))
  grads = loss(params)
  assert float(jnp.abs(grads["NestedMLP_0"]["Dense_0"]["input_scale"])) > 0


def test_top_level_exports():
  assert efqat_jax.quantize is quantize
  assert efqat_jax.QuantRule is QuantRule


def test_layer_that_bypasses_its_op_is_reported_instead_of_silently_left_in_float():
  class OwnMatmulDense(nn.Dense):
    @nn.compact
    def __call__(self, x):
      kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
      return x @ kernel

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return OwnMatmulDense(4)(x)

  with pytest.raises(ValueError, match="never called"):
    quantize(Model(), ALL_W4A4).init(KEY, FEATURES)
