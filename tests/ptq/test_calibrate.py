"""Calibration: running ranges become the quantized model's scales."""

import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tqdm

from efqat_jax.nn import QuantRule, quantize
from efqat_jax.ptq import calibrate
from efqat_jax.quant import QuantSpec, ranges
from efqat_jax.train import make_mesh, shard_batch

W4, A4 = QuantSpec.for_weights(4), QuantSpec.for_activations(4)


class TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16)(x))  # Dense_0: sees the raw batches
    return nn.Dense(3)(h)


def _batches():
  keys = jax.random.split(jax.random.key(1), 3)
  return [2.0 * jax.random.normal(k, (8, 6)) + i for i, k in enumerate(keys)]


def _ema_scale_and_zero_point(batches):
  """Momentum-0.9 EMA of the batch minima and maxima (the first batch sets them), as A4 params."""
  lo, hi = float(np.min(batches[0])), float(np.max(batches[0]))
  for b in batches[1:]:
    lo, hi = 0.9 * lo + 0.1 * float(np.min(b)), 0.9 * hi + 0.1 * float(np.max(b))
  return ranges.scale_and_zero_point(jnp.float32(lo), jnp.float32(hi), A4)


def test_input_ranges_are_the_ema_of_calibration_batches():
  model = quantize(TwoDense(), QuantRule(".*", weight=W4, input=A4))
  variables = model.init(jax.random.key(0), jnp.ones((8, 6)))
  batches = _batches()
  calibrated = calibrate(model, variables, batches, num_batches=2)
  scale, zero_point = _ema_scale_and_zero_point(batches[:2])  # the third batch is not used
  first = calibrated["params"]["Dense_0"]
  np.testing.assert_allclose(first["input_scale"], scale, rtol=1e-5)
  np.testing.assert_allclose(first["input_zero_point"], zero_point)
  assert int(calibrated["quant_stats"]["Dense_0"]["input_count"]) == 2
  assert float(first["input_scale"]) != pytest.approx(
    float(variables["params"]["Dense_0"]["input_scale"])
  )
  # Dense_1 sees relu(Dense_0(x)) computed in float (calibration runs the float ops), by hand.
  d0 = variables["params"]["Dense_0"]
  kernel, bias = np.asarray(d0["kernel"], np.float64), np.asarray(d0["bias"], np.float64)
  hidden = [np.maximum(np.asarray(b, np.float64) @ kernel + bias, 0.0) for b in batches[:2]]
  scale, zero_point = _ema_scale_and_zero_point(hidden)
  second = calibrated["params"]["Dense_1"]
  np.testing.assert_allclose(second["input_scale"], scale, rtol=1e-5)
  np.testing.assert_allclose(second["input_zero_point"], zero_point)
  assert int(calibrated["quant_stats"]["Dense_1"]["input_count"]) == 2


@pytest.mark.parametrize("on_mesh", [False, True])
def test_every_batch_runs_one_compiled_program_on_a_mesh_too(on_mesh, compilations):
  """Batches sharded over a mesh (as the pipeline gives them) reuse the first batch's program:
  the ranges are placed where the program puts them before the first batch."""
  model = quantize(TwoDense(), QuantRule(".*", weight=W4, input=A4))
  variables = jax.jit(model.init)(jax.random.key(0), jnp.ones((8, 6)))
  mesh = make_mesh()
  batches = [shard_batch({"x": b}, mesh)["x"] if on_mesh else b for b in _batches()]
  with compilations("observe") as observe:
    calibrated = calibrate(model, variables, batches, num_batches=3)
  assert observe.count == 1
  assert int(calibrated["quant_stats"]["Dense_0"]["input_count"]) == 3


def _np_fake_quant_columns(w, s, qmax):
  """Symmetric fake quantization of ``w`` with one scale per column, in float64."""
  return s * np.clip(np.round(w / s), -qmax, qmax)


def test_weight_estimators_give_the_minmax_and_the_least_squared_error_kernel_scales():
  w2 = QuantSpec.for_weights(2)  # per output channel, grid [-1, 1]
  scales, errors = {}, {}
  for estimator in ("minmax", "mse"):
    model = quantize(TwoDense(), QuantRule(".*", weight=w2, input=None), weight_estimator=estimator)
    variables = model.init(jax.random.key(0), jnp.ones((8, 6)))
    params = calibrate(model, variables, _batches(), num_batches=1)["params"]["Dense_0"]
    kernel = np.asarray(params["kernel"], np.float64)  # (6, 16): output channels are columns
    scales[estimator] = np.asarray(params["kernel_scale"], np.float64)
    w_hat = _np_fake_quant_columns(kernel, scales[estimator], w2.qmax)
    errors[estimator] = np.sum((w_hat - kernel) ** 2, axis=0)
  max_abs = np.abs(kernel).max(axis=0)
  np.testing.assert_allclose(scales["minmax"], max_abs / w2.qmax, rtol=1e-6)
  # mse, brute force per output channel: of the min-max extents shrunk by the default 100
  # ratios in [0.2, 1], the one with the smallest squared error.
  ratios = np.linspace(1.0, 0.2, 100)[:, None]
  candidates = [
    np.sum((_np_fake_quant_columns(kernel, s, w2.qmax) - kernel) ** 2, axis=0)
    for s in ratios * max_abs / w2.qmax
  ]
  np.testing.assert_allclose(errors["mse"], np.min(candidates, axis=0), rtol=1e-5)
  chosen = scales["mse"] * w2.qmax / max_abs
  assert np.all(np.isclose(chosen, ratios, rtol=1e-5).any(axis=0))
  assert errors["mse"].sum() < 0.9 * errors["minmax"].sum()


def test_calibrate_needs_batches():
  model = quantize(TwoDense(), QuantRule(".*", weight=W4, input=A4))
  variables = model.init(jax.random.key(0), jnp.ones((8, 6)))
  with pytest.raises(ValueError, match="num_batches"):
    calibrate(model, variables, _batches(), num_batches=0)
  with pytest.raises(ValueError, match="no batches"):
    calibrate(model, variables, [], num_batches=2)
  with pytest.raises(ValueError, match="weight_estimator"):
    quantize(TwoDense(), QuantRule(".*", weight=W4, input=A4), weight_estimator="l1").init(
      jax.random.key(0), jnp.ones((8, 6))
    )


@pytest.mark.parametrize(("num_batches", "available"), [(2, 3), (3, 3), (5, 3)])
def test_progress_is_called_after_every_batch_with_the_count_done(num_batches, available):
  model = quantize(TwoDense(), QuantRule(".*", weight=W4, input=A4))
  variables = model.init(jax.random.key(0), jnp.ones((8, 6)))
  done = []
  calibrated = calibrate(
    model, variables, _batches()[:available], num_batches, progress=done.append
  )
  assert done == list(range(1, min(num_batches, available) + 1))
  assert int(calibrated["quant_stats"]["Dense_0"]["input_count"]) == len(done)


def test_progress_drives_a_tqdm_bar():
  model = quantize(TwoDense(), QuantRule(".*", weight=W4, input=A4))
  variables = model.init(jax.random.key(0), jnp.ones((8, 6)))
  out = io.StringIO()
  with tqdm.tqdm(total=2, desc="ptq calibrate", file=out) as bar:
    calibrate(model, variables, _batches(), 2, progress=lambda done: bar.update())
  assert bar.n == 2 and "ptq calibrate" in out.getvalue() and "2/2" in out.getvalue()
