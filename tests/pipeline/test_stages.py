"""The pipeline end to end: every stage on every bundled dataset, the stage plan, resume."""

import itertools
import json
import re
import shutil

import numpy as np
import pytest

from efqat_jax import allocator, pipeline
from efqat_jax.errors import DataError
from efqat_jax.pipeline.ptq import config_formats
from efqat_jax.train import Checkpointer, read_scalars
from tests.pipeline.conftest import tiny_config


@pytest.mark.parametrize("dataset", ["digits", "shakespeare_char/seq64"])
def test_every_stage_runs_for_classification_and_for_a_language_model(
  dataset, data_dir, tmp_path, finished
):
  if dataset == "digits":
    _, tmp_path, results = finished
  else:
    config = tiny_config(dataset, data_dir, eval_split="validation[:512]")
    config.stages = "fp,ptq,efqat,export"  # qat: the same code path as for digits
    config.efqat.importance = "ptq_error"  # ranked against the fp stage's model
    results = pipeline.run_pipeline(config, tmp_path)
  assert set(results) >= {"fp", "ptq", "efqat", "export"}
  metric = "bits_per_char" if dataset.startswith("shakespeare") else "accuracy"
  for stage in ("fp", "ptq", "efqat"):
    assert np.isfinite(results[stage][metric]) and results[stage]["wall_time_s"] > 0
    assert results[stage]["allocator"] == allocator.current()  # what the wall time ran under
  assert results["efqat"]["method"] == "efqat"
  assert results["efqat"]["rho_unit"] == "work"
  assert 0 < results["efqat"]["work_fraction"] <= results["efqat"]["rho"]
  assert results["efqat"]["importance"] == ("bn_folded" if dataset == "digits" else "ptq_error")
  times = results["efqat"]
  assert times["train_time_s"] + times["eval_time_s"] == pytest.approx(times["wall_time_s"])
  assert min(times["train_time_s"], times["eval_time_s"]) > 0
  assert results["export"]["prediction_agreement"] > 0.9 and results["export"]["source"] == "efqat"
  assert json.loads((tmp_path / "results.json").read_text()) == results
  for stage in ("fp", "ptq", "efqat"):  # eval metrics in TensorBoard, at the last step
    assert read_scalars(tmp_path / "tb" / stage)["eval/loss"][-1][1] == pytest.approx(
      results[stage]["loss"]
    )
  assert results["efqat"]["selections"] == 2 and 0 < results["efqat"]["channel_fraction"] < 1
  logged = read_scalars(tmp_path / "tb" / "efqat")
  every = 3 if dataset == "digits" else 1
  assert [step for step, _ in logged["selection/channel_fraction"]] == [0, every]


def test_ptq_checkpoint_carries_the_formats_and_later_stages_build_their_model_from_them(
  finished,
):
  _, tmp_path, results = finished
  with Checkpointer(tmp_path / "ptq") as ckpt:
    _, metadata = ckpt.restore_latest_with_metadata(None)
  formats = metadata["formats"]
  assert {f["weight"]["bits"] for f in formats.values()} == {4, 8}
  assert re.fullmatch(r"W8A8 x 2, W4A4 x \d+", results["ptq"]["formats"])  # first, last at 8
  with np.load(tmp_path / "export" / "layers.npz") as npz:
    for path, fmt in formats.items():
      assert int(npz[f"{path}/weight_bits"]) == fmt["weight"]["bits"]
      q = npz[f"{path}/weight"]
      bound = 2 ** (fmt["weight"]["bits"] - 1) - 1
      assert np.abs(q).max() <= bound  # 4-bit integers stored in int8, and said so


def test_rtn_stores_weights_on_their_grid(finished):
  tmp_path = finished[1]
  with Checkpointer(tmp_path / "ptq") as ckpt:
    params = ckpt.read()["params"]
  kernel, scale = params["Conv_1"]["kernel"], params["Conv_1"]["kernel_scale"]
  units = kernel / scale
  np.testing.assert_allclose(units, np.round(units), atol=1e-4)
  assert np.abs(np.round(units)).max() <= 7


def test_a_stage_not_asked_for_runs_only_when_a_later_one_needs_it_and_says_so(
  data_dir, tmp_path, capsys
):
  config = tiny_config("digits", data_dir, stages="ptq")
  results = pipeline.run_pipeline(config, tmp_path)
  assert list(results) == ["fp", "ptq"]
  assert "fp: not in config.stages, but ptq needs it: running it" in capsys.readouterr().err
  assert pipeline.plan(config, set(results)) == {}  # all finished: nothing runs again
  config.stages = "export"
  assert pipeline.plan(config, set(results)) == {"fp": (), "ptq": ("fp",), "export": ("ptq",)}
  assert pipeline.plan(config, {*results, "qat"}) == {
    "fp": (),
    "ptq": ("fp",),
    "qat": ("ptq",),
    "export": ("qat",),
  }
  config.stages = "efqat"
  assert pipeline.plan(config, set(results)) == {"fp": (), "ptq": ("fp",), "efqat": ("ptq",)}
  config.efqat.importance = "ptq_error"  # ranks against the float model: reads stage fp too
  assert pipeline.plan(config, set(results))["efqat"] == ("ptq", "fp")
  config.stages, config.qat.method = "qat", "efqat"
  assert pipeline.plan(config, set(results))["qat"] == ("ptq", "fp")


def _final_params(workdir, stage):
  with Checkpointer(workdir / stage) as ckpt:
    return ckpt.latest_step(), ckpt.read()["params"]


def test_train_batches_from_any_step_continue_the_run_across_epochs(data_dir, tmp_path):
  run = pipeline.Run(tiny_config("digits", data_dir), tmp_path)
  run.config.batch_size = len(run.train_source) // 3  # 3 steps per epoch
  straight = [b["labels"] for b in itertools.islice(run.train_batches(0), 8)]
  for start in (2, 3, 4):
    resumed = [b["labels"] for b in itertools.islice(run.train_batches(start), 8 - start)]
    np.testing.assert_array_equal(np.stack(resumed), np.stack(straight[start:]))
  assert not np.array_equal(straight[0], straight[3])  # epochs are reshuffled


def test_high_precision_pattern_covering_every_layer_quantizes_all_at_high_precision(
  data_dir, tmp_path
):
  config = tiny_config("digits", data_dir, stages="fp,ptq")
  config.quant.high_precision_layers = "Conv_.*|Dense_.*"
  run, _ = pipeline.prepare(config, tmp_path)
  formats = config_formats(run, run.placeholder_inputs())
  assert len(formats) == 3 and all(f["weight"]["bits"] == 8 for f in formats.values())


def test_a_finished_export_is_skipped_and_export_alone_exports_the_last_trained_model(
  finished, tmp_path
):
  config, source, first = finished
  shutil.copytree(source, tmp_path / "w")
  workdir = tmp_path / "w"
  layers = workdir / "export" / "layers.npz"
  written = layers.stat().st_mtime_ns
  assert pipeline.run_pipeline(config, workdir) == first
  assert layers.stat().st_mtime_ns == written  # not rewritten
  results = json.loads((workdir / "results.json").read_text())
  del results["export"]  # export again, alone: from the last trained model, efqat
  (workdir / "results.json").write_text(json.dumps(results))
  config = config.copy_and_resolve_references()
  config.stages = "export"
  again = pipeline.run_pipeline(config, workdir)
  assert again["export"]["sha256"] == first["export"]["sha256"]


def test_a_finished_export_whose_file_was_damaged_is_an_error_not_a_silent_pass(finished, tmp_path):
  config, source, _ = finished
  shutil.copytree(source, tmp_path / "w")
  layers = tmp_path / "w" / "export" / "layers.npz"
  layers.write_bytes(layers.read_bytes()[:100])
  with pytest.raises(
    DataError, match=r"layers\.npz is missing or differs from the export recorded"
  ):
    pipeline.run_pipeline(config, tmp_path / "w")
