"""Every user error is one line naming the field and what is allowed, raised before any file
is written; the field listing covers every field; every shipped config passes the checks."""

import importlib.util
import os
import pathlib

import ml_collections
import pytest

from efqat_jax import fields, pipeline
from efqat_jax.config import base_config
from efqat_jax.errors import ConfigError
from efqat_jax.pipeline.qat_block_replacement import BLOCK_REPLACEMENT
from tests.pipeline.conftest import tiny_config

CONFIGS = pathlib.Path(__file__).parents[2] / "configs"


def _files_under(path):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize(
  "field, value, allowed",
  [
    ("stages", "fp,train", "a comma-separated list of fp, ptq, qat, efqat, export"),
    ("model", "vgg", "one of ['cnn'"),
    ("batch_size", 0, "a positive integer"),
    ("task", "regression", "one of ['classification', 'lm']"),
    ("fp.steps", -1, "an integer >= 0"),
    ("qat.learning_rate", 0.0, "a finite number > 0"),
    ("qat.method", "partial", "one of ['full', 'efqat']"),
    ("quant.weight_bits", 1, "an integer in 2..16"),
    ("quant.act_bits", 17, "an integer in 2..16"),
    ("quant.weight_estimator", "l2", "one of"),
    ("quant.high_precision_layers", "(", "a valid regular expression"),
    ("ptq.calibration_batches", 0, "a positive integer"),
    ("ptq.method", "gptq", "one of ['rtn'"),
    ("seed", -1, "an integer >= 0"),
    ("fp.steps", True, "an integer >= 0"),
    ("fp.weight_decay", float("nan"), "a finite number >= 0"),
    ("efqat.mode", "random", "one of"),
    ("efqat.rho", 1.5, "a finite number >= 0 and <= 1"),
    ("efqat.reselect_every", -1, "an integer >= 0"),
    ("efqat.bucket", 0, "a positive integer"),
    (
      "efqat.importance",
      "rounding_error",
      "one of ['mean_abs', 'fan_in', 'bn_folded', 'ptq_error']",
    ),
    ("efqat.steps", -5, "an integer >= 0"),
    ("export.source", "fp", "one of ['auto', 'ptq', 'qat', 'efqat']"),
  ],
)
def test_a_bad_value_is_one_line_naming_the_field_and_the_allowed_values(
  field, value, allowed, tmp_path
):
  config = ml_collections.ConfigDict(base_config().to_dict(), type_safe=False)  # any type
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  workdir = tmp_path / "never_created"
  with pytest.raises(ConfigError) as error:
    pipeline.run_pipeline(config, workdir)
  message = str(error.value)
  assert message.startswith(f"config.{field} = {value!r} is not allowed: ") and allowed in message
  assert "\n" not in message
  assert not workdir.exists()


def test_an_unknown_field_lists_the_nearest_valid_names(tmp_path):
  config = base_config()
  with config.qat.unlocked():
    config.qat.stpes = 3
  with pytest.raises(
    ConfigError, match=r"config\.qat\.stpes is not a config field \(did you mean 'qat\.steps'"
  ):
    pipeline.run_pipeline(config, tmp_path / "never_created")


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(task="lm"), r"config\.task = 'lm' needs \['tokens'\]"),
    (dict(batch_size=2048), r"config\.batch_size = 2048 is not allowed: at most the \d+ examples"),
    (
      dict(quant={"high_precision_layers": "Conv9"}),
      r"config\.quant\.high_precision_layers = 'Conv9' matches no layer",
    ),
    (dict(dataset="no_such_data"), r"config\.dataset"),
    (dict(dataset="mnist"), r"config\.dataset"),
    (dict(eval_split="tset"), r"config\.eval_split"),
    (dict(train_split="train[:5%"), r"config\.train_split"),
    (dict(model_kwargs={"depth": 3}), r"config\.model_kwargs"),
  ],
)
def test_a_config_that_does_not_fit_the_data_or_model_fails_before_any_file_is_written(
  overrides, message, tmp_path
):
  data_dir = tmp_path / "data"  # not prepared yet: the checks read metadata only
  config = tiny_config("digits", str(data_dir))
  for key, value in overrides.items():
    if isinstance(value, dict):
      config[key].update(value)
    else:
      config[key] = value
  with pytest.raises(ConfigError, match=message) as error:
    pipeline.run_pipeline(config, tmp_path / "work")
  assert "\n" not in str(error.value)
  assert _files_under(tmp_path) == []


def _shipped_config(path: pathlib.Path) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda p: p.stem)
def test_every_shipped_config_passes_every_check_without_writing_a_file(path, tmp_path):
  """configs/*.py: field values, dataset, model and layer-path patterns fit, as
  ``pipeline.prepare`` checks them before a run; its block-replacement boundaries too."""
  config = _shipped_config(path)
  config.data_dir = str(tmp_path / "data")  # not prepared: the checks read metadata only
  run, stages = pipeline.prepare(config, tmp_path / "work")
  assert list(stages) == config.stages.split(",")
  BLOCK_REPLACEMENT.check(run, config.block_replacement)
  assert _files_under(tmp_path) == []


def test_the_field_listing_shows_every_field_with_its_default_and_meaning():
  config = base_config()
  listing = fields.describe(pipeline.pipeline_schema(), config)
  names = [line.split()[0] for line in listing.splitlines()]
  assert names == [name for name, _ in fields.walk(pipeline.pipeline_schema())]
  for expected in (
    "seed",
    "qat.method",
    "ptq.method",
    "efqat.rho",
    "export.source",
    "quant.weight_bits",
  ):
    assert expected in names
  assert "the trained fraction" in listing and "0.1" in listing


def test_every_registered_component_brings_its_config_block():
  schema = pipeline.pipeline_schema()
  assert set(fields.lookup(schema, "efqat")) >= {"steps", "mode", "rho", "reselect_every"}
  assert fields.lookup(schema, "qat.method").check.ok("efqat")
  config = base_config()
  fields.validate(config, schema)  # the defaults are valid
