"""Calibration: running ranges become the quantized model's scales."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efqat_jax.nn import QuantRule, quantize
from efqat_jax.ptq import calibrate
from efqat_jax.quant import QuantSpec, fake_quant, ranges

W4, A4 = QuantSpec.for_weights(4), QuantSpec.for_activations(4)


class TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16)(x))  # Dense_0: sees the raw batches
    return nn.Dense(3)(h)


def _batches():
  keys = jax.random.split(jax.random.key(1), 3)
  return [2.0 * jax.random.normal(k, (8, 6)) + i for i, k in enumerate(keys)]


def test_input_ranges_are_the_ema_of_calibration_batches():
  model = quantize(TwoDense(), QuantRule(".*", weight=W4, input=A4))
  variables = model.init(jax.random.key(0), jnp.ones((8, 6)))
  batches = _batches()
  calibrated = calibrate(model, variables, batches, num_batches=2)
  lo = 0.9 * batches[0].min() + 0.1 * batches[1].min()
  hi = 0.9 * batches[0].max() + 0.1 * batches[1].max()
  scale, zero_point = ranges.scale_and_zero_point(lo, hi, A4)
  first = calibrated["params"]["Dense_0"]
  np.testing.assert_allclose(first["input_scale"], scale, rtol=1e-5)
  np.testing.assert_allclose(first["input_zero_point"], zero_point)
  assert int(calibrated["quant_stats"]["Dense_0"]["input_count"]) == 2
  assert float(first["input_scale"]) != pytest.approx(
    float(variables["params"]["Dense_0"]["input_scale"])
  )


def test_mse_weight_estimator_lowers_weight_error_at_low_bits():
  w2 = QuantSpec.for_weights(2)
  errors = {}
  for estimator in ("minmax", "mse"):
    model = quantize(TwoDense(), QuantRule(".*", weight=w2, input=None), weight_estimator=estimator)
    variables = model.init(jax.random.key(0), jnp.ones((8, 6)))
    params = calibrate(model, variables, _batches(), num_batches=1)["params"]["Dense_0"]
    w_hat = fake_quant(
      params["kernel"], params["kernel_scale"], spec=QuantSpec.for_weights(2, axis=1)
    )
    errors[estimator] = float(jnp.sum((w_hat - params["kernel"]) ** 2))
  assert errors["mse"] < 0.9 * errors["minmax"]


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
