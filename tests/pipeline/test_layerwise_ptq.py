"""The layer-wise PTQ methods in the pipeline: AXE's accumulator guarantee from PTQ through QAT
and EfQAT to the export, and one-line errors for accumulator settings that cannot work."""

import os

import numpy as np
import pytest

from efqat_jax import pipeline
from efqat_jax.errors import ConfigError
from efqat_jax.nn import export_integer
from efqat_jax.nn.formats import accumulator_of
from efqat_jax.pipeline.context import Run
from efqat_jax.quant import check_accumulators
from efqat_jax.train import Checkpointer
from tests.pipeline.conftest import tiny_config

BITS = 12  # below the data-type bound of the W4A4 convolutions (14 bits): the constraint binds


def test_an_axe_model_stays_overflow_free_through_qat_and_efqat_to_the_export(data_dir, tmp_path):
  config = tiny_config("digits", data_dir)
  config.quant.high_precision_layers = ""  # every layer W4A4
  config.ptq.method = "axe_gpfq"
  config.ptq.axe_gpfq.update(accumulator_bits=BITS, accumulator_tile=0)
  for stage in ("qat", "efqat"):  # large steps: unprojected, they would leave the constraint
    config[stage].update(steps=4, learning_rate=0.05, quant_lr_multiplier=1.0)
  results = pipeline.run_pipeline(config, tmp_path)
  ptq, export = results["ptq"], results["export"]
  assert ptq["overflow_free"] is True and ptq["accumulator_needed_bits"] <= BITS
  assert ptq["accumulator_datatype_bound"] > BITS
  assert ptq["formats"] == f"W4A4 x 3; {BITS}-bit accumulators"
  assert export["source"] == "efqat" and export["overflow_free"] is True
  assert all(layer["fits"] for layer in export["accumulator_layers"].values())
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
  assert spec.bits == BITS and spec.tile is None
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
