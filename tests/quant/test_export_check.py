"""The numpy-only re-check of an export's accumulators, on hand-made files: the tiles follow the
recorded order, the worst case covers the recorded input range, and it runs without jax."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from efqat_jax.quant import check_export_accumulators, export_check

MODULE = pathlib.Path(export_check.__file__)


def conv_arrays(order="hwc", bits=9, tile=8, input_range=(0, 15)):
  """One 3x3 convolution over 4 input channels, HWIO, 2 output channels: output channel 0 has
  +7 on every tap of input channel 0, output channel 1 is all zeros. Tiles of 8 in ``hwc`` order
  hold 2 of those taps (15 * 14 = 210 fits 9 bits), in ``chw`` order 8 (15 * 56 = 840 does not)."""
  weight = np.zeros((3, 3, 4, 2), np.int8)
  weight[:, :, 0, 0] = 7
  return {
    "Conv_0/weight": weight,
    "Conv_0/op": np.asarray("conv"),
    "Conv_0/kernel_output_axes": np.asarray([3], np.int32),
    "Conv_0/kernel_input_axes": np.asarray([2, 0, 1], np.int32),
    "Conv_0/input_bits": np.asarray(4, np.int32),
    "Conv_0/input_signed": np.asarray(0, np.int32),
    "Conv_0/input_min": np.asarray(input_range[0], np.int64),
    "Conv_0/input_max": np.asarray(input_range[1], np.int64),
    "Conv_0/accumulator_bits": np.asarray(bits, np.int32),
    "Conv_0/accumulator_tile": np.asarray(tile, np.int64),
    "Conv_0/accumulation_order": np.asarray(order),
    # A layer without an accumulator promise is not checked.
    "Dense_0/weight": np.full((8, 3), 7, np.int8),
    "Dense_0/op": np.asarray("dot_general"),
  }


def saved(tmp_path, arrays):
  path = tmp_path / "layers.npz"
  np.savez(path, **arrays)
  return path


def test_the_tiles_follow_the_recorded_order(tmp_path):
  hwc = check_export_accumulators(saved(tmp_path, conv_arrays("hwc")))
  assert list(hwc) == ["Conv_0"]
  assert hwc["Conv_0"].fits and hwc["Conv_0"].worst_partial_sum == 15 * 14
  assert hwc["Conv_0"].limit == 255 and hwc["Conv_0"].tiles == 2 * 5
  chw = check_export_accumulators(saved(tmp_path, conv_arrays("chw")))["Conv_0"]
  assert not chw.fits and chw.worst_partial_sum == 15 * 56 and chw.overflowing_tiles == 1
  assert "1 tiles can reach 840 > 255" in chw.problem
  # One accumulator per channel (the tile is the whole row): the order does not matter.
  for order in ("hwc", "chw"):
    whole = check_export_accumulators(saved(tmp_path, conv_arrays(order, bits=11, tile=36)))
    assert whole["Conv_0"].fits and whole["Conv_0"].worst_partial_sum == 15 * 63


def test_signed_inputs_and_an_input_range_that_does_not_cover_the_grid(tmp_path):
  signed = conv_arrays("hwc", bits=9, input_range=(-8, 7))
  signed["Conv_0/input_signed"] = np.asarray(1, np.int32)
  check = check_export_accumulators(saved(tmp_path, signed))["Conv_0"]
  assert check.fits and check.worst_partial_sum == 8 * 14  # x = -8 on every +7 tap
  narrow = conv_arrays("hwc", input_range=(0, 7))  # 4-bit unsigned inputs reach 15
  check = check_export_accumulators(saved(tmp_path, narrow))["Conv_0"]
  assert not check.fits and "does not cover the input grid [0, 15]" in check.problem


def test_a_missing_field_or_an_unknown_order_is_an_error(tmp_path):
  arrays = conv_arrays()
  del arrays["Conv_0/input_max"]
  with pytest.raises(ValueError, match="Conv_0: the export has no Conv_0/input_max"):
    check_export_accumulators(saved(tmp_path, arrays))
  with pytest.raises(ValueError, match=r"accumulation_order 'hwio' is not one of \['hwc', 'chw'\]"):
    check_export_accumulators(saved(tmp_path, conv_arrays("hwio")))


def test_the_checker_runs_with_numpy_alone(tmp_path):
  """The module, loaded from its file with jax unimportable, checks a file from the command
  line: status 0 when every layer fits, 1 when one can overflow."""
  script = (
    "import runpy, sys; sys.modules['jax'] = None; sys.modules['efqat_jax'] = None;"
    f" sys.argv = ['export_check.py', sys.argv[1]]; runpy.run_path({str(MODULE)!r},"
    " run_name='__main__')"
  )
  for order, status in (("hwc", 0), ("chw", 1)):
    path = saved(tmp_path, conv_arrays(order))
    out = subprocess.run(
      [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == status, out.stderr
    verdict = "fits" if status == 0 else "CAN OVERFLOW"
    assert out.stdout.startswith("Conv_0: 9-bit accumulator, tiles of 8 in " + order)
    assert verdict in out.stdout and out.stderr == ""
