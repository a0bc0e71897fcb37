"""The benchmarks' stage runner (bench/stage_runs.py): a finished stage is reused only when the
workdir's fingerprint says it was made with the same config values."""

import json
import pathlib
import shutil
import sys

import pytest

from efqat_jax import pipeline
from efqat_jax.errors import ConfigError, DataError

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))
import stage_runs  # noqa: E402


def test_a_finished_stage_is_restored_only_with_the_config_it_was_made_with(finished, tmp_path):
  config, workdir, results = finished
  here = tmp_path / "run"
  shutil.copytree(workdir, here)
  run = pipeline.Run(config, here)
  assert stage_runs.run_stage(run, "fp", {}) is not None
  assert run.results["fp"] == results["fp"]  # restored, not trained again
  assert stage_runs.stage_results(config, here, None, ("ptq", "efqat")) == results

  source = tmp_path / "unexported"  # a chain that ends in a stage taking one input, its source
  shutil.copytree(workdir, source)
  shutil.rmtree(source / "export")
  recorded = json.loads((source / "results.json").read_text())
  del recorded["export"]
  (source / "results.json").write_text(json.dumps(recorded))
  (tmp_path / "seeded.partial").mkdir()  # left by a copy cut short
  seeded = stage_runs.seeded_workdir(source, tmp_path / "seeded")
  again = stage_runs.stage_results(config, seeded, None, ("ptq", "efqat", "export"))
  assert again["export"]["sha256"] == results["export"]["sha256"]  # the same bytes, exported again
  assert "export" not in json.loads((source / "results.json").read_text())  # the source untouched
  assert stage_runs.seeded_workdir(source, seeded) == seeded  # made once: not copied over
  assert json.loads((seeded / "results.json").read_text())["export"] == again["export"]

  changed = config.copy_and_resolve_references()
  changed.fp.steps += 1
  with pytest.raises(ConfigError, match=r"fp\.steps \(used by fp, ptq, qat, efqat"):
    stage_runs.run_stage(pipeline.Run(changed, here), "fp", {})
  changed = config.copy_and_resolve_references()
  changed.efqat.rho_unit = "blocks"  # the default changed under a finished efqat stage
  with pytest.raises(ConfigError, match=r"efqat\.rho_unit \(used by efqat"):
    stage_runs.stage_results(changed, here, None, ("efqat",))

  shutil.rmtree(here / "stage_configs")  # made before fingerprints were recorded
  with pytest.raises(DataError, match="no fingerprint"):
    stage_runs.run_stage(pipeline.Run(config, here), "fp", {})

  fresh = pipeline.Run(config, tmp_path / "fresh")
  stage_runs.run_stage(fresh, "fp", {})
  assert (tmp_path / "fresh" / "stage_configs" / "fp.json").exists()
  assert stage_runs.run_stage(pipeline.Run(config, tmp_path / "fresh"), "fp", {}) is not None
