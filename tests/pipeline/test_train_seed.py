"""``train_seed`` varies the stages after PTQ (their data order and dropout) while the fp and ptq
stages, their fingerprints and checkpoints, are reused as they are."""

import json
import shutil

import pytest

from efqat_jax import pipeline
from efqat_jax.errors import ConfigError

AFTER_PTQ = ("qat", "efqat", "export")


def without_stages_after_ptq(source, target):
  """A copy of the finished workdir ``source`` with only its fp and ptq outputs."""
  shutil.copytree(source, target)
  for stage in AFTER_PTQ:
    shutil.rmtree(target / stage)
    shutil.rmtree(target / "tb" / stage, ignore_errors=True)
    (target / "stage_configs" / f"{stage}.json").unlink()
  results = json.loads((target / "results.json").read_text())
  (target / "results.json").write_text(json.dumps({s: results[s] for s in ("fp", "ptq")}))
  return target


def fingerprint(workdir, stage):
  return json.loads((workdir / "stage_configs" / f"{stage}.json").read_text())


def test_a_train_seed_reuses_fp_and_ptq_and_changes_qat(finished, tmp_path):
  config, source, results = finished
  outcomes = {}
  for train_seed in (config.seed, config.seed + 1):
    workdir = without_stages_after_ptq(source, tmp_path / str(train_seed))
    changed = config.copy_and_resolve_references()
    changed.stages, changed.train_seed = "fp,ptq,qat", train_seed
    outcomes[train_seed] = pipeline.run_pipeline(changed, workdir)
    for stage in ("fp", "ptq"):  # restored, not redone: the same wall time and checkpoint
      assert outcomes[train_seed][stage] == results[stage]
      assert fingerprint(workdir, stage) == fingerprint(source, stage)
    assert fingerprint(workdir, "qat")["fields"]["train_seed"] == train_seed
  # train_seed equal to seed trains as the default (-1) did; another seed trains otherwise.
  assert outcomes[config.seed]["qat"]["loss"] == results["qat"]["loss"]
  assert outcomes[config.seed + 1]["qat"]["loss"] != results["qat"]["loss"]


def test_a_changed_train_seed_names_the_stages_after_ptq(finished, tmp_path):
  config, source, results = finished
  workdir = shutil.copytree(source, tmp_path / "w")
  changed = config.copy_and_resolve_references()
  changed.train_seed = config.seed + 1
  with pytest.raises(ConfigError, match=r"train_seed \(used by qat, efqat, export\)"):
    pipeline.run_pipeline(changed, workdir)
  assert json.loads((workdir / "results.json").read_text()) == results


def test_a_workdir_from_before_train_seed_is_reused(finished, tmp_path):
  config, source, results = finished
  workdir = shutil.copytree(source, tmp_path / "w")
  for stage in AFTER_PTQ:  # as written before the field existed
    path = workdir / "stage_configs" / f"{stage}.json"
    saved = fingerprint(workdir, stage)
    del saved["fields"]["train_seed"]
    path.write_text(json.dumps(saved))
  assert pipeline.run_pipeline(config, workdir) == results
