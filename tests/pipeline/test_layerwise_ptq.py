"""The layer-wise PTQ methods in the pipeline: AXE's accumulator guarantee from PTQ through QAT
and EfQAT to the export (tiles in the configured order, recorded in the export file), one-line
errors for accumulator settings that cannot work, and a stop for layers left all zero."""

import os

import numpy as np
import pytest

from efqat_jax import pipeline
from efqat_jax.errors import ConfigError
from efqat_jax.nn import export_integer
from efqat_jax.nn.formats import accumulator_of
from efqat_jax.pipeline.context import Run
from efqat_jax.pipeline.zero_weights import check_zeroed_layers, zero_weights_line, zeroed_layers
from efqat_jax.quant import check_accumulators, check_export_accumulators
from efqat_jax.train import Checkpointer
from tests.pipeline.conftest import tiny_config

# Tiles of 8 inputs of W4A4 layers need 12 bits for any weights (the data-type bound): at 9
# the constraint binds, and Conv_1's 3x3 x 4-channel tiles differ between the two orders.
BITS, TILE = 9, 8


def test_an_axe_model_stays_overflow_free_through_qat_and_efqat_to_the_export(
  data_dir, tmp_path, capsys
):
  config = tiny_config("digits", data_dir)
  config.quant.high_precision_layers = ""  # every layer W4A4
  config.ptq.method = "axe_gpfq"
  config.ptq.axe_gpfq.update(accumulator_bits=BITS, accumulator_tile=TILE)
  for stage in ("qat", "efqat"):  # large steps: unprojected, they would leave the constraint
    config[stage].update(steps=4, learning_rate=0.05, quant_lr_multiplier=1.0)
  results = pipeline.run_pipeline(config, tmp_path)
  ptq, export = results["ptq"], results["export"]
  assert ptq["overflow_free"] is True and ptq["accumulator_needed_bits"] <= BITS
  assert ptq["accumulator_datatype_bound"] > BITS
  assert ptq["formats"] == f"W4A4 x 3; {BITS}-bit accumulators, tiles of {TILE} in hwc order"
  conv_1 = ptq["accumulator_layers"]["Conv_1"]
  assert (conv_1["fits"], conv_1["tile"], conv_1["order"]) == (True, TILE, "hwc")
  assert ptq["zeroed_layers"] == []
  assert set(ptq["zero_weight_share"]) == {"Conv_0", "Conv_1", "Dense_0"}
  assert all(0 <= share < 1 for share in ptq["zero_weight_share"].values())
  assert "ptq axe_gpfq: zero weights per layer: Conv_0 " in capsys.readouterr().out
  assert export["source"] == "efqat" and export["overflow_free"] is True
  assert all(layer["fits"] for layer in export["accumulator_layers"].values())
  # The file records what the proof assumed, and re-checks from the file alone.
  path = tmp_path / "export" / "layers.npz"
  with np.load(path) as arrays:
    for unit in ("Conv_0", "Conv_1", "Dense_0"):
      assert str(arrays[f"{unit}/accumulation_order"]) == "hwc"
      assert int(arrays[f"{unit}/accumulator_bits"]) == BITS
      assert int(arrays[f"{unit}/accumulator_tile"]) == TILE
      assert (int(arrays[f"{unit}/input_min"]), int(arrays[f"{unit}/input_max"])) == (0, 15)
  checks = check_export_accumulators(path)
  assert set(checks) == {"Conv_0", "Conv_1", "Dense_0"} and all(c.fits for c in checks.values())
  # Summed input channel first instead, the same integers overflow (the order is part of it).
  with np.load(path) as arrays:
    relabelled = {k: arrays[k] for k in arrays.files} | {
      "Conv_1/accumulation_order": np.asarray("chw")
    }
  np.savez(tmp_path / "relabelled.npz", **relabelled)
  assert not check_export_accumulators(tmp_path / "relabelled.npz")["Conv_1"].fits
  # The qat stage's model keeps it too (checked here, as the export would).
  run = Run(config, tmp_path)
  with Checkpointer(tmp_path / "ptq") as ckpt:
    _, metadata = ckpt.restore_latest_with_metadata(None)
  formats = metadata["formats"]
  with Checkpointer(tmp_path / "qat") as ckpt:
    state = ckpt.read()
  qat = {"params": state["params"], **state["collections"]}
  qmodel = run.quantized_model(formats)
  layers = export_integer(qmodel, qat, run.sample_inputs, train=False)
  spec = accumulator_of(formats, "Conv_1")
  assert (spec.bits, spec.tile, spec.order) == (BITS, TILE, "hwc")
  assert all(r.fits for r in check_accumulators(layers, spec).values())
  with Checkpointer(tmp_path / "ptq") as ckpt:
    ptq_vars, _ = ckpt.restore_latest_with_metadata(None)
  moved = np.abs(qat["params"]["Conv_1"]["kernel"] - ptq_vars["params"]["Conv_1"]["kernel"])
  assert moved.max() > 0  # training did change the weights


@pytest.mark.parametrize(
  "method, field, value, message",
  [
    ("axe_optq", "accumulator_bits", 2, r"config\.ptq\.axe_optq\.accumulator_bits = 2 is not allowed"),
    ("axe_optq", "accumulator_tile", 2, r"config\.ptq\.axe_optq\.accumulator_tile = 2 is not allowed: 0, or an integer >= 3"),
    ("axe_gpfq", "accumulator_bits", 8, r"config\.ptq\.axe_gpfq\.accumulator_bits = 8 leaves no room for any non-zero weight of \S+ \(8-bit inputs\): allowed an integer in 9\.\.32"),
    ("axe_gpfq", "accumulation_order", "hwio", r"config\.ptq\.axe_gpfq\.accumulation_order = 'hwio' is not allowed: one of \['hwc', 'chw'\]"),
    ("optq", "damping", 0.0, r"config\.ptq\.optq\.damping = 0\.0 is not allowed"),
  ],
)  # fmt: skip
def test_bad_layerwise_settings_are_one_line_errors_before_any_file_is_written(
  method, field, value, message, tmp_path
):
  config = tiny_config("digits", str(tmp_path / "data"))  # the first layer: 8-bit inputs
  config.ptq.method = method
  config.ptq[method][field] = value
  with pytest.raises(ConfigError, match=message) as error:
    pipeline.run_pipeline(config, tmp_path / "work")
  assert "\n" not in str(error.value)
  assert [f for _, _, fs in os.walk(tmp_path) for f in fs] == []


def test_a_layer_left_all_zero_stops_the_ptq_stage_before_anything_is_written(data_dir, tmp_path):
  """A 5-bit accumulator leaves room for one +1 and one -1 per channel of 4-bit inputs: AXE
  rounds the whole dense layer to zero, which would be overflow-free and useless."""
  config = tiny_config("digits", data_dir, stages="fp,ptq")
  config.quant.high_precision_layers = ""
  config.ptq.method = "axe_gpfq"
  config.ptq.axe_gpfq.accumulator_bits = 5
  with pytest.raises(ConfigError) as error:
    pipeline.run_pipeline(config, tmp_path)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith("ptq: axe_gpfq left every weight of Dense_0 at zero")
  assert "raise config.ptq.axe_gpfq.accumulator_bits (now 5)" in message
  assert message.endswith("or set config.ptq.allow_zeroed_layers = True")
  assert "ptq" not in Run(config, tmp_path).results and not (tmp_path / "ptq").exists()


def test_zeroed_layers_pass_only_where_the_config_allows_them():
  config = tiny_config("digits", "unused")
  shares = {"Conv_0": 0.25, "Dense_0": 1.0}
  with pytest.raises(
    ConfigError,
    match=r"^ptq: rtn left every weight of Dense_0 at zero .* raise config\.quant\.weight_bits",
  ):
    check_zeroed_layers(config.ptq, shares)
  config.ptq.allow_zeroed_layers = True
  check_zeroed_layers(config.ptq, shares)
  assert zeroed_layers(shares) == ["Dense_0"]
  assert zero_weights_line("rtn", shares) == (
    "ptq rtn: zero weights per layer: Conv_0 25.0%, Dense_0 100.0% (all zero)"
  )
