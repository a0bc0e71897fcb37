"""The accumulation order of a convolution's inputs: AXE, the QAT projection, the overflow proof
and the export's record all take tiles in the same, configured order, and the numpy re-check of
an export fails when the file names another order than the one its weights were made for."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efqat_jax.fields import to_config
from efqat_jax.nn import QuantRule, export_integer, quantize, quantized_layers
from efqat_jax.nn.formats import layer_formats, with_accumulator
from efqat_jax.pipeline.export import export_arrays
from efqat_jax.ptq import PTQ_METHODS, calibrate, quantize_weights
from efqat_jax.qat import project_params
from efqat_jax.quant import (
  AccumulatorSpec,
  QuantSpec,
  check_accumulator,
  check_export_accumulators,
)

W4, A4 = QuantSpec.for_weights(4), QuantSpec.for_activations(4)
BITS, TILE = 8, 8  # tiles of 8 of a 3x3 kernel on 4 input channels: the orders' tiles differ
OTHER = {"hwc": "chw", "chw": "hwc"}


class OneConv(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(6, (3, 3), padding="SAME")(x)


@functools.cache
def calibrated(dead_channel: bool = False):
  """A 3x3 convolution over 4 channels, W4A4, calibrated; with ``dead_channel`` its input
  channel 0 is always zero."""
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (16, 5, 5, 4)))
  if dead_channel:
    x = x.at[..., 0].set(0.0)
  qmodel = quantize(OneConv(), QuantRule(".*", weight=W4, input=A4))
  variables = calibrate(qmodel, jax.jit(qmodel.init)(jax.random.key(1), x), [x], 1)
  return qmodel, {k: v for k, v in variables.items() if k != "quant_stats"}, x


def axe(method: str, order: str, params=None, dead_channel: bool = False):
  """The AXE method's params (``params``: the weights to quantize, default the calibrated)."""
  qmodel, variables, x = calibrated(dead_channel)
  m = PTQ_METHODS.get(method)
  settings = to_config(m.fields)
  settings.update(accumulator_bits=BITS, accumulator_tile=TILE, accumulation_order=order)
  layers = quantized_layers(qmodel, variables, x)
  capture = m.capture_for(qmodel, variables, [x], settings)
  return quantize_weights(m, params or variables["params"], layers, settings, capture)


@functools.cache
def axe_layer(method: str, order: str):
  qmodel, variables, x = calibrated()
  params = axe(method, order)
  return export_integer(qmodel, {**variables, "params": params}, x)


@pytest.mark.parametrize("order", ["hwc", "chw"])
@pytest.mark.parametrize("method", ["axe_gpfq", "axe_optq"])
def test_axe_fits_the_tiles_of_its_order_and_those_of_the_other_order_overflow(method, order):
  (layer,) = axe_layer(method, order).values()
  report = check_accumulator(layer, AccumulatorSpec(BITS, TILE, order))
  assert report.fits and report.order == order
  assert check_accumulator(layer, AccumulatorSpec(BITS + 4)).fits  # no tiles, any order: 12 bits
  assert not check_accumulator(layer, AccumulatorSpec(BITS, TILE, OTHER[order])).fits


@pytest.mark.parametrize("order", ["hwc", "chw"])
def test_the_projection_fits_the_tiles_of_its_order(order):
  qmodel, variables, x = calibrated()
  spec = AccumulatorSpec(BITS, TILE, order)
  layers = quantized_layers(qmodel, variables, x)
  (before,) = export_integer(qmodel, variables, x).values()
  assert not check_accumulator(before, spec).fits
  params = jax.jit(lambda p: project_params(p, layers, {"Conv_0": spec}))(variables["params"])
  (after,) = export_integer(qmodel, {**variables, "params": params}, x).values()
  assert check_accumulator(after, spec).fits
  assert not check_accumulator(after, AccumulatorSpec(BITS, TILE, OTHER[order])).fits


@pytest.mark.parametrize("order", ["hwc", "chw"])
def test_the_export_re_checks_in_its_recorded_order_and_fails_in_the_other(order, tmp_path):
  qmodel, variables, x = calibrated()
  exported = axe_layer("axe_gpfq", order)
  formats = with_accumulator(
    layer_formats(quantized_layers(qmodel, variables, x)), AccumulatorSpec(BITS, TILE, order)
  )
  arrays = export_arrays(exported, formats)
  assert str(arrays["Conv_0/accumulation_order"]) == order
  assert int(arrays["Conv_0/accumulator_bits"]) == BITS
  assert int(arrays["Conv_0/accumulator_tile"]) == TILE
  assert (int(arrays["Conv_0/input_min"]), int(arrays["Conv_0/input_max"])) == (0, 15)
  assert int(arrays["Conv_0/input_bits"]) == 4 and int(arrays["Conv_0/input_signed"]) == 0
  path = tmp_path / "layers.npz"
  np.savez(path, **arrays)
  (check,) = check_export_accumulators(path).values()
  assert check.fits and check.order == order and check.worst_partial_sum <= check.limit == 127
  np.savez(path, **{**arrays, "Conv_0/accumulation_order": np.asarray(OTHER[order])})
  (wrong,) = check_export_accumulators(path).values()
  assert not wrong.fits and wrong.overflowing_tiles > 0 and wrong.order == OTHER[order]


def test_axe_ignores_the_weights_of_dead_inputs():
  """A dead input's weight ends at zero, so it must not change the soft threshold (or
  anything else) of the live weights it shares a tile with."""
  _, variables, _ = calibrated(dead_channel=True)
  kernel = variables["params"]["Conv_0"]["kernel"]  # HWIO: channel 0 never fires
  results = []
  for dead_weight in (0.0, 3.0):
    params = jax.tree.map(lambda a: a, variables["params"])
    params["Conv_0"]["kernel"] = kernel.at[:, :, 0, :].set(dead_weight * jnp.sign(kernel[:, :, 0]))
    results.append(
      np.asarray(axe("axe_optq", "hwc", params, dead_channel=True)["Conv_0"]["kernel"])
    )
  assert results[0][:, :, 1:].any()  # the live weights are not all zero
  np.testing.assert_array_equal(results[0][:, :, 0], 0.0)
  np.testing.assert_array_equal(results[1], results[0])
