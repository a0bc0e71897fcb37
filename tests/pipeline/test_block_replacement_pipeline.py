"""Block replacement in the pipeline: QAT and EfQAT train on it from the PTQ model with the fp
stage's model as the partner; its settings are part of their fingerprints; bad boundaries are
one-line errors before any file is written."""

import os

import pytest

from efqat_jax import pipeline
from efqat_jax.errors import ConfigError
from tests.pipeline.conftest import tiny_config


def test_qat_and_efqat_train_with_block_replacement_and_its_settings_fingerprint_them(
  data_dir, tmp_path
):
  config = tiny_config("digits", data_dir, stages="qat,efqat")
  config.qat.loss = config.efqat.loss = "block_replacement"
  config.block_replacement.update(boundaries="Conv_1,Dense_0", reading="swap")
  results = pipeline.run_pipeline(config, tmp_path)
  assert results["qat"]["qat_loss"] == results["efqat"]["qat_loss"] == "block_replacement"
  assert results["efqat"]["method"] == "efqat" and 0 <= results["efqat"]["accuracy"] <= 1
  config.block_replacement.temperature = 2.0
  with pytest.raises(ConfigError, match=r"block_replacement\.temperature") as error:
    pipeline.run_pipeline(config, tmp_path)
  assert "qat" in str(error.value) and "efqat" in str(error.value)


@pytest.mark.parametrize(
  "boundaries, message",
  [
    ("Conv_9", r"^config\.block_replacement\.boundaries = 'Conv_9': 'Conv_9' is no module holding a quantized layer; those modules are \['Conv_0', 'Conv_1', 'Dense_0'\]$"),
    ("Dense_0,Conv_1", r"^config\.block_replacement\.boundaries = 'Dense_0,Conv_1': 'Conv_1' does not come after 'Dense_0' in call order"),
  ],
)  # fmt: skip
def test_bad_boundaries_are_one_line_errors_before_any_file_is_written(
  boundaries, message, tmp_path
):
  config = tiny_config("digits", str(tmp_path / "data"))
  config.qat.loss = "block_replacement"
  config.block_replacement.boundaries = boundaries
  with pytest.raises(ConfigError, match=message) as error:
    pipeline.run_pipeline(config, tmp_path / "work")
  assert "\n" not in str(error.value)
  assert [f for _, _, fs in os.walk(tmp_path) for f in fs] == []
