"""Attention Round and mixed precision in the pipeline: the chosen bits travel from PTQ through
QAT to the export, within the budget; bad settings are one-line errors before any file."""

import os

import pytest

from efqat_jax import pipeline
from efqat_jax.errors import ConfigError
from efqat_jax.train import Checkpointer
from tests.pipeline.conftest import tiny_config


def test_attention_round_with_mixed_bits_runs_through_qat_to_the_export(data_dir, tmp_path, capsys):
  config = tiny_config("digits", data_dir)
  config.ptq.method = "attention_round"
  config.ptq.attention_round.update(steps=3, samples=16, batch_size=8)
  config.quant.update(mixed_precision="coding_length", bit_candidates=(2, 4, 8), budget_bits=3)
  results = pipeline.run_pipeline(config, tmp_path)
  ptq = results["ptq"]
  bits = ptq["weight_bits_per_layer"]
  assert bits["Conv_0"] == bits["Dense_0"] == 8  # first and last: high precision, fixed
  assert bits["Conv_1"] in (2, 4) and ptq["budget_bits"] == 3 and ptq["used_bits"] <= 3
  assert ptq["method"] == "attention_round" and "ptq mixed precision" in capsys.readouterr().out
  with Checkpointer(tmp_path / "ptq") as ckpt:
    _, metadata = ckpt.restore_latest_with_metadata(None)
  assert metadata["formats"]["Conv_1"]["weight"]["bits"] == bits["Conv_1"]
  # QAT and EfQAT started from it (the later stages build the model from those formats).
  assert {"qat", "efqat"} <= set(results) and results["export"]["source"] == "efqat"
  assert results["export"]["prediction_agreement"] > 0.9


def test_sensitivity_allocation_gives_each_free_layer_a_candidate(data_dir, tmp_path):
  config = tiny_config("digits", data_dir)
  config.quant.update(
    mixed_precision="sensitivity", bit_candidates=(3, 5), budget_bits=4,
    high_precision_layers="Conv_0",
  )  # fmt: skip
  ptq = pipeline.STAGES.get("ptq")
  run = pipeline.Run(config, tmp_path)
  fp = pipeline.STAGES.get("fp").run(run, {})
  ptq.run(run, {"fp": fp})
  bits = run.results["ptq"]["weight_bits_per_layer"]
  assert bits["Conv_0"] == 8 and {bits["Conv_1"], bits["Dense_0"]} <= {3, 5}
  assert run.results["ptq"]["used_bits"] <= 4


@pytest.mark.parametrize(
  "block, field, value, message",
  [
    ("quant", "budget_bits", 1.5, r"^config\.quant\.budget_bits = 1\.5 is not allowed: at least the smallest of config\.quant\.bit_candidates \(2 bits per weight\), or 0 for weight_bits$"),
    ("quant", "bit_candidates", (1, 4), r"^config\.quant\.bit_candidates = \(1, 4\) is not allowed: a non-empty tuple of integers in 2\.\.16"),
    ("ptq.attention_round", "blocks", "Block_\\d", r"^config\.ptq\.attention_round\.blocks = 'Block_\\\\d' matches no module holding a quantized layer; those modules are \["),
    ("ptq.attention_round", "variant", "gumbel", r"^config\.ptq\.attention_round\.variant = 'gumbel' is not allowed"),
  ],
)  # fmt: skip
def test_bad_settings_are_one_line_errors_before_any_file_is_written(
  block, field, value, message, tmp_path
):
  config = tiny_config("digits", str(tmp_path / "data"))
  config.quant.mixed_precision = "coding_length"
  config.ptq.method = "attention_round"
  node = config
  for name in block.split("."):
    node = node[name]
  node[field] = value
  with pytest.raises(ConfigError, match=message) as error:
    pipeline.run_pipeline(config, tmp_path / "work")
  assert "\n" not in str(error.value)
  assert [f for _, _, fs in os.walk(tmp_path) for f in fs] == []
