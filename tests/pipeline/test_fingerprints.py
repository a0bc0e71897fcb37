"""A changed config never reuses a stage's result silently: each changed field names every
stage it affects, and a stage output without its fingerprint is an error."""

import json
import shutil

import pytest

from efqat_jax import pipeline
from efqat_jax.errors import ConfigError, DataError


@pytest.fixture
def workdir(finished, tmp_path):
  shutil.copytree(finished[1], tmp_path / "w")
  return tmp_path / "w"


@pytest.mark.parametrize(
  "field, value, stages",
  [
    ("eval_split", "train", "fp, ptq, qat, efqat, export"),
    ("quant.weight_bits", 3, "ptq, qat, efqat, export"),
    ("qat.steps", 3, "qat"),
    ("efqat.rho", 0.5, "efqat, export"),
    ("ptq.calibration_batches", 3, "ptq, qat, efqat, export"),
  ],
)
def test_a_changed_field_names_every_stage_it_affects(finished, workdir, field, value, stages):
  config, _, results = finished
  changed = config.copy_and_resolve_references()
  section, _, name = field.rpartition(".")
  (changed[section] if section else changed)[name] = value
  with pytest.raises(ConfigError) as error:
    pipeline.run_pipeline(changed, workdir)
  assert f"{field} (used by {stages})" in str(error.value)
  assert json.loads((workdir / "results.json").read_text()) == results  # nothing lost


def test_fields_that_do_not_change_a_result_may_change(finished, workdir):
  config, _, results = finished
  changed = config.copy_and_resolve_references()
  changed.eval_batch_size, changed.log_every, changed.checkpoint_every = 256, 1, 7
  assert pipeline.run_pipeline(changed, workdir) == results


def test_a_field_added_since_counts_as_its_default(finished, workdir):
  config, _, results = finished
  for stage in ("qat", "efqat", "export"):  # as written before the field existed
    path = workdir / "stage_configs" / f"{stage}.json"
    saved = json.loads(path.read_text())
    saved["fields"] = {k: v for k, v in saved["fields"].items() if not k.endswith(".loss")}
    path.write_text(json.dumps(saved))
  assert pipeline.run_pipeline(config, workdir) == results
  changed = config.copy_and_resolve_references()
  changed.qat.loss = "block_replacement"
  with pytest.raises(ConfigError, match=r"qat\.loss \(used by qat\)"):
    pipeline.run_pipeline(changed, workdir)


def test_a_stage_output_without_its_fingerprint_is_an_error_not_a_pass(finished, workdir):
  config, _, _ = finished
  shutil.rmtree(workdir / "stage_configs")
  changed = config.copy_and_resolve_references()
  changed.qat.steps = 3
  with pytest.raises(DataError, match=r"fp has no fingerprint .*stage_configs/fp\.json"):
    pipeline.run_pipeline(changed, workdir)


def test_the_export_remembers_which_model_it_came_from(finished, workdir):
  config, _, _ = finished
  changed = config.copy_and_resolve_references()
  changed.export.source = "qat"
  with pytest.raises(ConfigError, match=r"export\.source \(used by export\)"):
    pipeline.run_pipeline(changed, workdir)
