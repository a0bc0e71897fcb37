"""QuantDense / QuantDenseGeneral / QuantConv: params, modes and gradients."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efqat_jax.nn import (
  Mode,
  QuantConv,
  QuantDense,
  QuantDenseGeneral,
  export_integer,
  integer_apply,
)
from efqat_jax.quant import QuantSpec, fake_quant, ranges

W4 = QuantSpec.for_weights(4)
A4 = QuantSpec.for_activations(4)
KEY = jax.random.key(0)
X_DENSE = jax.random.normal(jax.random.key(1), (4, 8))
X_CONV = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))

LAYERS = [
  (QuantDense, nn.Dense, dict(features=5), X_DENSE),
  (QuantDenseGeneral, nn.DenseGeneral, dict(features=(2, 3)), X_DENSE),
  (QuantConv, nn.Conv, dict(features=4, kernel_size=(3, 3), strides=2), X_CONV),
]


@pytest.mark.parametrize("quant_cls, float_cls, kwargs, x", LAYERS)
def test_params_are_float_params_plus_quantization_params(quant_cls, float_cls, kwargs, x):
  q_vars = quant_cls(**kwargs, weight_spec=W4, input_spec=A4).init(KEY, x)
  f_vars = float_cls(**kwargs).init(KEY, x)
  assert set(q_vars["params"]) == set(f_vars["params"]) | {
    "kernel_scale",
    "input_scale",
    "input_zero_point",
  }
  chex.assert_trees_all_equal(
    {k: q_vars["params"][k] for k in f_vars["params"]}, dict(f_vars["params"])
  )
  assert set(q_vars) == {"params"}  # running ranges exist only while calibrating


@pytest.mark.parametrize("quant_cls, float_cls, kwargs, x", LAYERS)
def test_float_mode_equals_flax_layer(quant_cls, float_cls, kwargs, x):
  layer = quant_cls(**kwargs, weight_spec=W4, input_spec=A4)
  variables = layer.init(KEY, x)
  out = layer.clone(mode=Mode.FLOAT).apply(variables, x)
  float_params = {k: v for k, v in variables["params"].items() if k in ("kernel", "bias")}
  chex.assert_trees_all_equal(out, float_cls(**kwargs).apply({"params": float_params}, x))


JIT_VARIANTS = pytest.mark.parametrize("variant", [lambda f: f, jax.jit], ids=["nojit", "jit"])


@JIT_VARIANTS
def test_quantize_mode_equals_fake_quantized_operands(variant):
  layer = QuantDense(5, weight_spec=W4, input_spec=A4)
  variables = layer.init(KEY, X_DENSE)
  p = variables["params"]
  out = variant(lambda v, x: layer.apply(v, x))(variables, X_DENSE)
  x_hat = fake_quant(X_DENSE, p["input_scale"], p["input_zero_point"], spec=A4)
  w_hat = fake_quant(p["kernel"], p["kernel_scale"], spec=W4)
  chex.assert_trees_all_close(out, x_hat @ w_hat + p["bias"], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out, X_DENSE @ p["kernel"] + p["bias"], atol=1e-3)


def test_initial_scales_come_from_min_max():
  layer = QuantConv(4, (3, 3), weight_spec=W4, input_spec=A4)
  p = layer.init(KEY, X_CONV)["params"]
  w_scale, _ = ranges.scale_and_zero_point(
    *ranges.minmax(p["kernel"], QuantSpec.for_weights(4, axis=3)), W4
  )
  x_scale, x_zp = ranges.scale_and_zero_point(*ranges.minmax(X_CONV, A4), A4)
  chex.assert_trees_all_close(p["kernel_scale"], w_scale)
  chex.assert_trees_all_close((p["input_scale"], p["input_zero_point"]), (x_scale, x_zp))
  assert p["kernel_scale"].shape == (4,)


def test_dense_general_kernel_scale_is_per_output_channel():
  p = QuantDenseGeneral((2, 3), weight_spec=W4).init(KEY, X_DENSE)["params"]
  assert p["kernel_scale"].shape == (2, 3)
  expected = jnp.max(jnp.abs(p["kernel"]), axis=0) / W4.qmax
  chex.assert_trees_all_close(p["kernel_scale"], expected)


def test_calibrate_mode_tracks_ema_of_input_range_and_computes_in_float():
  layer = QuantDense(5, input_spec=A4, mode=Mode.CALIBRATE)
  variables = layer.init(KEY, X_DENSE)
  second = 3.0 * X_DENSE + 1.0
  out1, state = layer.apply(variables, X_DENSE, mutable=["params"])
  _, state = layer.apply(state, second, mutable=["params"])
  stats = state["params"]  # the running range rides in params (so nn.scan maps it)
  assert int(stats["input_count"]) == 2
  np.testing.assert_allclose(
    stats["input_min"], 0.9 * X_DENSE.min() + 0.1 * second.min(), rtol=1e-6
  )
  np.testing.assert_allclose(
    stats["input_max"], 0.9 * X_DENSE.max() + 0.1 * second.max(), rtol=1e-6
  )
  lo, hi = stats["input_min"], stats["input_max"]
  chex.assert_trees_all_close(
    (stats["input_scale"], stats["input_zero_point"]), ranges.scale_and_zero_point(lo, hi, A4)
  )
  p = variables["params"]
  chex.assert_trees_all_close(out1, X_DENSE @ p["kernel"] + p["bias"], rtol=1e-6)


def test_calibrate_mode_without_mutable_params_raises():
  layer = QuantDense(5, mode=Mode.CALIBRATE)
  variables = layer.init(KEY, X_DENSE)
  with pytest.raises(ValueError, match="mutable=\\['params'\\]"):
    layer.apply(variables, X_DENSE)


def test_weight_only_and_input_only_layers_create_only_their_params():
  weight_only = QuantDense(5, weight_spec=W4, input_spec=None).init(KEY, X_DENSE)
  input_only = QuantDense(5, weight_spec=None, input_spec=A4).init(KEY, X_DENSE)
  assert set(weight_only["params"]) == {"kernel", "bias", "kernel_scale"}
  assert set(input_only["params"]) == {"kernel", "bias", "input_scale", "input_zero_point"}


def test_symmetric_input_spec_has_no_zero_point():
  spec = QuantSpec(bits=8, signed=True, symmetric=True)
  params = QuantDense(5, input_spec=spec).init(KEY, X_DENSE)["params"]
  assert "input_zero_point" not in params


@JIT_VARIANTS
def test_gradients_reach_kernel_bias_and_quantization_params(variant):
  layer = QuantConv(4, (3, 3), weight_spec=W4, input_spec=A4)
  params = layer.init(KEY, X_CONV)["params"]
  loss = lambda p: jnp.sum(layer.apply({"params": p}, X_CONV) ** 2)
  grads = variant(jax.grad(loss))(params)
  for name in ("kernel", "bias", "kernel_scale", "input_scale", "input_zero_point"):
    assert grads[name].shape == params[name].shape
    assert bool(jnp.all(jnp.isfinite(grads[name])))
  for name in ("kernel", "bias", "kernel_scale", "input_scale"):
    assert float(jnp.abs(grads[name]).sum()) > 0, name


def test_non_learnable_specs_give_zero_scale_gradients():
  layer = QuantDense(
    5,
    weight_spec=QuantSpec.for_weights(4, learnable=False),
    input_spec=QuantSpec.for_activations(4, learnable=False),
  )
  params = layer.init(KEY, X_DENSE)["params"]
  grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, X_DENSE) ** 2))(params)
  for name in ("kernel_scale", "input_scale", "input_zero_point"):
    chex.assert_trees_all_equal(grads[name], jnp.zeros_like(params[name]))
  assert float(jnp.abs(grads["kernel"]).sum()) > 0


def test_layer_keeps_flax_features_bf16_dtype():
  layer = QuantDense(5, dtype=jnp.bfloat16)
  variables = layer.init(KEY, X_DENSE)
  assert layer.apply(variables, X_DENSE).dtype == jnp.bfloat16
  assert variables["params"]["kernel"].dtype == jnp.float32


def test_asymmetric_weight_spec_is_rejected_naming_the_field():
  layer = QuantDense(5, weight_spec=QuantSpec(bits=4, signed=False, symmetric=False))
  with pytest.raises(ValueError, match="weight_spec must be symmetric"):
    layer.init(KEY, X_DENSE)


def test_a_scale_pushed_through_zero_acts_as_its_magnitude_and_exports():
  """Any optimizer may push a stored scale through zero; the layer then quantizes with |scale|
  (never a negative or zero step), and export and the integer path still work."""
  layer = QuantDense(5, weight_spec=W4, input_spec=A4)
  variables = layer.init(KEY, X_DENSE)
  p = dict(variables["params"])
  flipped = {
    **p,
    "kernel_scale": -p["kernel_scale"],
    "input_scale": -p["input_scale"],
    "input_zero_point": p["input_zero_point"] + 100.0,  # off the grid: clipped to qmax
  }
  expected = {**p, "input_zero_point": jnp.clip(p["input_zero_point"] + 100.0, 0, 15)}
  out = layer.apply({"params": flipped}, X_DENSE)
  chex.assert_trees_all_close(out, layer.apply({"params": expected}, X_DENSE))
  zero = layer.apply({"params": {**p, "kernel_scale": jnp.zeros_like(p["kernel_scale"])}}, X_DENSE)
  assert np.all(np.isfinite(zero))
  (exported,) = export_integer(layer, {"params": flipped}, X_DENSE).values()
  assert np.all(exported.weight_scale > 0)
  y, _ = integer_apply(layer, {"params": flipped}, X_DENSE)
  chex.assert_trees_all_close(y, out, atol=1e-5)


def test_plain_adamw_on_small_calibrated_scales_keeps_a_valid_quantizer():
  """The README's optimizer without a quant learning-rate multiplier: Adam moves each scale by
  about the learning rate per step, far more than a 4-bit weight scale of ~0.002."""
  layer = QuantDense(5, weight_spec=W4, input_spec=A4)
  variables = layer.init(KEY, X_DENSE)
  params = {**variables["params"], "kernel": variables["params"]["kernel"] * 0.01}
  params["kernel_scale"] = jnp.max(jnp.abs(params["kernel"]), axis=0) / W4.qmax
  tx = optax.adamw(1e-3)
  loss = lambda p: jnp.mean(layer.apply({"params": p}, X_DENSE) ** 2)  # pulls the scales down
  opt_state = tx.init(params)
  for _ in range(20):
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    params = optax.apply_updates(params, updates)
  assert np.any(params["kernel_scale"] < 0)  # the stored scales did cross zero
  assert np.isfinite(float(loss(params)))
  (exported,) = export_integer(layer, {"params": params}, X_DENSE).values()
  y, _ = integer_apply(layer, {"params": params}, X_DENSE)
  chex.assert_trees_all_close(y, layer.apply({"params": params}, X_DENSE), atol=1e-5)
