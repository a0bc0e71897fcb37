"""Faults never give a wrong result: kills resume to the identical result, a garbled checkpoint
falls back or stops with one line, non-finite training stops, outputs are written atomically."""

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from efqat_jax import pipeline
from efqat_jax.errors import CorruptCheckpointError, NonFiniteError, WorkdirError
from efqat_jax.pipeline.context import Run
from efqat_jax.pipeline.results_file import seal
from efqat_jax.train import Checkpointer
from tests.pipeline.conftest import faults_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


_config = faults_config


TIMES = ("wall_time_s", "train_time_s", "eval_time_s")


def _outcome(workdir):
  """What a run leaves: every stage's final params, the export bytes, the metrics."""
  params = {}
  for stage in ("fp", "ptq", "qat", "efqat"):
    with Checkpointer(workdir / stage) as ckpt:
      params[stage] = (ckpt.latest_step(), ckpt.read()["params"])
  results = json.loads((workdir / "results.json").read_text())
  metrics = {
    s: {k: v for k, v in r.items() if k not in TIMES + ("recompiles_this_process", "digest")}
    for s, r in results.items()
  }
  return params, (workdir / "export" / "layers.npz").read_bytes(), metrics


@pytest.fixture(scope="module")
def straight(finished):
  return _outcome(finished[1])


def _assert_same(outcome, expected):
  (params, npz, metrics), (params0, npz0, metrics0) = outcome, expected
  assert metrics == metrics0 and npz == npz0
  for stage, (step, tree) in params.items():
    assert step == params0[stage][0]
    jax.tree.map(np.testing.assert_array_equal, tree, params0[stage][1])


# Each kills the run with SIGKILL at one moment: mid-write of an efqat checkpoint (a random
# moment of its asynchronous save), and mid-write of the export.
KILLS = {
  "mid_checkpoint": """
    import random, time
    from efqat_jax.train import checkpoint
    save = checkpoint.Checkpointer.save
    def dying_save(self, step, state, **kw):
      save(self, step, state, **kw)
      if self.directory.name == "efqat" and step == 2:
        time.sleep(random.Random(0).uniform(0, 0.05))
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.Checkpointer.save = dying_save
  """,
  "mid_export": """
    replace = os.replace
    def dying_replace(src, dst):
      if str(dst).endswith("layers.npz"):
        os.kill(os.getpid(), signal.SIGKILL)
      replace(src, dst)
    os.replace = dying_replace
  """,
}


def test_kills_at_any_moment_resume_to_the_identical_result(straight, data_dir, tmp_path):
  """One run killed twice (mid-checkpoint, mid-export), then finished: every stage's params, the
  export and the metrics equal an uninterrupted run's. Each rerun also restores the stages
  finished before the kill."""
  for moment in ("mid_checkpoint", "mid_export"):
    script = "import os, signal, sys\n" + textwrap.dedent(KILLS[moment])
    script += textwrap.dedent(f"""
      from efqat_jax import pipeline
      from tests.pipeline.test_faults import _config
      pipeline.run_pipeline(_config({data_dir!r}), {str(tmp_path)!r})
    """)
    killed = subprocess.run(
      [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True
    )
    assert killed.returncode == -9, (moment, killed.stderr[-2000:])
  assert list((tmp_path / "export").glob(".layers.npz.*.partial"))
  assert not (tmp_path / "export" / "layers.npz").exists()
  assert "export" not in json.loads((tmp_path / "results.json").read_text())
  pipeline.run_pipeline(_config(data_dir), tmp_path)
  _assert_same(_outcome(tmp_path), straight)
  assert not [*tmp_path.glob(".*.partial"), *tmp_path.glob("*/.*.partial")]  # cleared


def _garble_latest(stage_dir: pathlib.Path) -> pathlib.Path:
  """Overwrites 256 bytes in the middle of the largest file of the newest checkpoint."""
  step = max(int(p.name) for p in stage_dir.iterdir() if p.name.isdigit())
  files = [p for p in (stage_dir / str(step)).rglob("*") if p.is_file()]
  target = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  middle = len(data) // 2
  data[middle : middle + 256] = bytes((b + 97) % 256 for b in data[middle : middle + 256])
  target.write_bytes(bytes(data))
  return stage_dir / str(step)


def test_a_garbled_latest_checkpoint_falls_back_to_the_newest_intact_one(
  straight, finished, tmp_path, capfd
):
  config, source, _ = finished
  shutil.copytree(source, tmp_path / "w")
  workdir = tmp_path / "w"
  garbled = _garble_latest(workdir / "efqat")  # its final checkpoint, step 5
  results = json.loads((workdir / "results.json").read_text())
  del results["export"]  # export again: it restores efqat, trains step 5 again from step 4
  (workdir / "results.json").write_text(json.dumps(results))
  pipeline.run_pipeline(config, workdir)
  err = capfd.readouterr().err
  assert f"checkpoint {garbled} is corrupt" in err and "resuming from step 4" in err
  assert (workdir / "efqat" / "5.corrupt").exists()  # moved aside, not deleted
  _assert_same(_outcome(workdir), straight)


def test_a_garbled_only_checkpoint_stops_with_one_line_naming_it(finished, tmp_path):
  config, source, _ = finished
  shutil.copytree(source, tmp_path / "w")
  workdir = tmp_path / "w"
  garbled = _garble_latest(workdir / "ptq")  # ptq has one checkpoint
  results = json.loads((workdir / "results.json").read_text())
  del results["qat"]  # qat runs again: it needs the ptq model
  (workdir / "results.json").write_text(json.dumps(results))
  shutil.rmtree(workdir / "qat")
  with pytest.raises(CorruptCheckpointError) as error:
    pipeline.run_pipeline(config, workdir)
  assert str(garbled) in str(error.value) and "\n" not in str(error.value)
  assert "qat" not in json.loads((workdir / "results.json").read_text())


def test_a_huge_learning_rate_stops_with_the_stage_and_step_keeping_the_last_good_checkpoint(
  data_dir, tmp_path, caplog
):
  config = _config(data_dir, stages="fp")
  config.fp.update(learning_rate=1e6, steps=6)
  with pytest.raises(NonFiniteError, match=r"fp.*step \d+") as error:
    pipeline.run_pipeline(config, tmp_path)
  assert "\n" not in str(error.value)
  assert [r.getMessage() for r in caplog.records if r.levelname != "INFO"] == []  # the line alone
  assert not (tmp_path / "results.json").exists()
  with Checkpointer(tmp_path / "fp") as ckpt:
    if ckpt.latest_step() is not None:
      assert all(np.isfinite(x).all() for x in jax.tree.leaves(ckpt.read()["params"]))


def test_nan_in_one_percent_of_the_images_stops_training(data_dir, tmp_path, monkeypatch):
  to_model_batch, seen = Run.to_model_batch, [0]

  def with_nan(self, batch):  # every 100th image the run reads is NaN
    out = to_model_batch(self, batch)
    images = out["inputs"].astype(np.float32)
    index = seen[0] + np.arange(len(images))
    images[index % 100 == 50] = np.nan
    seen[0] += len(images)
    return {**out, "inputs": images}

  monkeypatch.setattr(Run, "to_model_batch", with_nan)
  config = _config(data_dir, stages="fp")
  config.fp.steps = 20
  with pytest.raises(NonFiniteError, match=r"fp"):
    pipeline.run_pipeline(config, tmp_path)
  assert not (tmp_path / "results.json").exists()


def _write_results(workdir, results):
  (workdir / "results.json").write_text(json.dumps(results))


def test_an_edited_result_is_refused_never_printed(finished, tmp_path):
  config, source, _ = finished
  workdir = tmp_path / "w"
  shutil.copytree(source, workdir)
  results = json.loads((workdir / "results.json").read_text())
  results["qat"]["accuracy"] = 0.99
  _write_results(workdir, results)
  with pytest.raises(WorkdirError) as error:
    pipeline.run_pipeline(config, workdir)
  message = str(error.value)
  assert "\n" not in message and str(workdir / "results.json") in message
  assert "'qat'" in message and "delete that entry" in message
  del results["qat"]  # as the message says: qat's result is recomputed from its checkpoint
  _write_results(workdir, results)
  assert pipeline.run_pipeline(config, workdir)["qat"]["accuracy"] == finished[2]["qat"]["accuracy"]


def test_a_deleted_stage_directory_is_rebuilt_identical_or_refused(finished, tmp_path, capfd):
  """A finished stage whose checkpoints are gone is trained again, with a note; its new final
  checkpoint must be the one recorded (the stages after it were made from that one)."""
  config, source, first = finished
  workdir = tmp_path / "w"
  shutil.copytree(source, workdir)
  shutil.rmtree(workdir / "fp")
  shutil.rmtree(workdir / "qat")
  assert pipeline.run_pipeline(config, workdir) == first
  err = capfd.readouterr().err
  for stage in ("fp", "qat"):
    assert f"{stage}: {workdir / stage} is missing; rebuilding it" in err
  with Checkpointer(workdir / "fp") as ckpt:
    assert ckpt.latest_step() == config.fp.steps
  # A rebuild that differs from the recorded one (here: the record says another model) stops.
  results = json.loads((workdir / "results.json").read_text())
  results["fp"]["checkpoint_digest"] = "0" * 64
  results["fp"] = seal(results["fp"])
  _write_results(workdir, results)
  shutil.rmtree(workdir / "fp")
  with pytest.raises(WorkdirError, match=r"rebuilt .*fp differs from the one results\.json"):
    pipeline.run_pipeline(config, workdir)
