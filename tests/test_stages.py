"""The pipeline end to end: stages on every bundled dataset, resume, config validation, CLI."""

import itertools
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from efqat_jax import stages
from efqat_jax.config import base_config
from efqat_jax.train import Checkpointer, read_scalars

TINY = {
  "mnist5k": dict(model="cnn", model_kwargs={"features": (4, 8), "hidden": 16}),
  "digits": dict(model="cnn", model_kwargs={"features": (4, 8)}),
  "shakespeare_char/seq64": dict(
    model="transformer",
    task="lm",
    eval_split="validation",
    model_kwargs=dict(
      vocab_size=256, d_model=16, num_heads=2, num_layers=1, mlp_dim=32, max_len=64
    ),
  ),
}


def tiny_config(dataset, data_dir, **overrides):
  config = base_config()
  config.dataset = dataset
  config.data_dir = data_dir
  for key, value in TINY[dataset].items():
    if key == "model_kwargs":
      config.model_kwargs.update(value)
    else:
      config[key] = value
  config.batch_size = 8
  config.eval_batch_size = 512
  config.progress = False
  config.fp.update(steps=2, warmup_steps=0)
  config.qat.update(steps=2, warmup_steps=0)
  config.efqat.update(steps=2, warmup_steps=0, reselect_every=1, mode="cwpn", rho=0.3)
  config.ptq.calibration_batches = 2
  config.update(overrides)
  return config


@pytest.mark.parametrize("dataset", list(TINY))
def test_every_stage_runs_on_every_bundled_dataset(dataset, data_dir, tmp_path):
  results = stages.run_pipeline(tiny_config(dataset, data_dir), tmp_path)
  assert list(results) == ["fp", "ptq", "qat", "efqat", "export"]
  metric = "bits_per_char" if dataset.startswith("shakespeare") else "accuracy"
  for stage in ("fp", "ptq", "qat", "efqat"):
    assert np.isfinite(results[stage][metric]) and results[stage]["wall_time_s"] > 0
  assert results["export"]["prediction_agreement"] > 0.9
  assert json.loads((tmp_path / "results.json").read_text()) == results
  assert (tmp_path / "export" / "layers.npz").exists()
  assert list((tmp_path / "tb" / "qat").glob("events.out.tfevents.*"))
  assert results["efqat"]["selections"] == 2 and 0 < results["efqat"]["channel_fraction"] < 1
  logged = read_scalars(tmp_path / "tb" / "efqat")
  assert [step for step, _ in logged["selection/channel_fraction"]] == [0, 1]
  layer = next(k for k in logged if k.endswith("/param_fraction") and k.count("/") > 1)
  assert 0 <= logged[layer][0][1] <= 1


def _final_params(workdir, stage):
  with Checkpointer(workdir / stage) as ckpt:
    return ckpt.latest_step(), ckpt.read()["params"]


@pytest.mark.parametrize("stage", ["qat", "efqat"])
def test_interrupted_run_resumes_to_the_uninterrupted_result(
  stage, data_dir, tmp_path, monkeypatch
):
  config = tiny_config("digits", data_dir, checkpoint_every=2, stages=f"fp,ptq,{stage}")
  config[stage].steps = 5
  config.efqat.reselect_every = 3  # selections at 0 and 3; the run resumes from step 2
  stages.run_pipeline(config, tmp_path / "straight")

  make_step, contexts = stages.make_train_step, []

  def dying_make_train_step(model, tx, mesh, **kwargs):
    contexts.append(kwargs.get("param_context"))
    step_fn, calls = make_step(model, tx, mesh, **kwargs), []

    def step(state, *args):
      calls.append(1)
      if len(calls) == 4 and "input_scale" in str(jax.tree_util.tree_structure(state.params)):
        raise KeyboardInterrupt  # killed in the quantized stage, after its checkpoint at step 2
      return step_fn(state, *args)

    return step

  monkeypatch.setattr(stages, "make_train_step", dying_make_train_step)
  with pytest.raises(KeyboardInterrupt):
    stages.run_pipeline(config, tmp_path / "resumed")
  # fp, then the quantized stage: only efqat restricts its backward pass
  assert contexts == [None, stages.restrict_backward if stage == "efqat" else None]
  assert stage not in json.loads((tmp_path / "resumed" / "results.json").read_text())
  monkeypatch.setattr(stages, "make_train_step", make_step)
  results = stages.run_pipeline(config, tmp_path / "resumed")

  step_a, params_a = _final_params(tmp_path / "straight", stage)
  step_b, params_b = _final_params(tmp_path / "resumed", stage)
  assert step_a == step_b == 5
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  straight = json.loads((tmp_path / "straight" / "results.json").read_text())
  assert results[stage]["accuracy"] == straight[stage]["accuracy"]


def test_train_batches_from_any_step_continue_the_run_across_epochs(data_dir, tmp_path):
  run = stages.Run(tiny_config("digits", data_dir), tmp_path)
  run.config.batch_size = len(run.train_source) // 3  # 3 steps per epoch
  straight = [b["labels"] for b in itertools.islice(run.train_batches(0), 8)]
  for start in (2, 3, 4):
    resumed = [b["labels"] for b in itertools.islice(run.train_batches(start), 8 - start)]
    np.testing.assert_array_equal(np.stack(resumed), np.stack(straight[start:]))
  assert not np.array_equal(straight[0], straight[3])  # epochs are reshuffled


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("stages", "fp,train", "config.stages"),
    ("model", "vgg", "config.model"),
    ("batch_size", 0, "config.batch_size"),
    ("task", "regression", "config.task"),
    ("fp.steps", -1, "config.fp.steps"),
    ("qat.learning_rate", 0.0, "config.qat.learning_rate"),
    ("quant.weight_bits", 1, "config.quant.weight_bits"),
    ("quant.act_bits", 17, "config.quant.act_bits"),
    ("quant.weight_estimator", "l2", "config.quant.weight_estimator"),
    ("quant.high_precision_layers", "(", "config.quant.high_precision_layers"),
    ("ptq.calibration_batches", 0, "config.ptq.calibration_batches"),
    ("seed", -1, "config.seed"),
    ("fp.steps", True, "config.fp.steps"),
    ("fp.weight_decay", float("nan"), "config.fp.weight_decay"),
    ("efqat.mode", "random", "config.efqat.mode"),
    ("efqat.rho", 1.5, "config.efqat.rho"),
    ("efqat.reselect_every", -1, "config.efqat.reselect_every"),
    ("efqat.reselect_every", "sometimes", "config.efqat.reselect_every"),
    ("efqat.bucket", 0, "config.efqat.bucket"),
    ("efqat.steps", -5, "config.efqat.steps"),
  ],
)
def test_bad_config_is_rejected_naming_the_field_before_any_work(field, value, message, tmp_path):
  config = base_config()
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  workdir = tmp_path / "never_created"
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    stages.run_pipeline(config, workdir)
  assert not workdir.exists()


def test_command_line_runs_and_prints_the_stage_table(data_dir, tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "efqat_jax.main",
    f"--workdir={tmp_path}",
    f"--config.data_dir={data_dir}",
    "--config.dataset=digits",
    "--config.model_kwargs.features=(4, 8)",
    "--config.model_kwargs.hidden=16",
    "--config.fp.steps=2",
    "--config.efqat.steps=2",
    "--config.stages=fp,ptq,efqat",
    "--config.progress=False",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "| fp | accuracy" in out.stdout and "| ptq | accuracy" in out.stdout
  assert "| efqat | accuracy" in out.stdout and "(cwpl, rho 0.1:" in out.stdout
  bad = subprocess.run([*cmd, "--config.quant.weight_bits=1"], capture_output=True, text=True)
  assert bad.returncode != 0 and "config.quant.weight_bits" in bad.stderr


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(task="lm"), "config.task"),
    (dict(batch_size=2048), "config.batch_size"),
    (dict(quant={"high_precision_layers": "Conv9"}), "config.quant.high_precision_layers"),
  ],
)
def test_config_that_does_not_fit_the_data_or_model_fails_before_training(
  overrides, message, data_dir, tmp_path
):
  config = tiny_config("digits", data_dir)
  for key, value in overrides.items():
    if isinstance(value, dict):
      config[key].update(value)
    else:
      config[key] = value
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    stages.run_pipeline(config, tmp_path)
  assert not (tmp_path / "fp").exists()


def test_high_precision_pattern_covering_every_layer_quantizes_all_at_high_precision(
  data_dir, tmp_path
):
  config = tiny_config("digits", data_dir, stages="fp,ptq")
  config.quant.high_precision_layers = "Conv_.*|Dense_.*"
  results = stages.run_pipeline(config, tmp_path)
  assert np.isfinite(results["ptq"]["accuracy"])


def test_export_alone_after_a_finished_run_exports_the_last_trained_model(data_dir, tmp_path):
  config = tiny_config("digits", data_dir)
  first = stages.run_pipeline(config, tmp_path)
  config.stages = "export"
  again = stages.run_pipeline(config, tmp_path)
  assert again["export"]["max_accumulator"] == first["export"]["max_accumulator"]
  assert again["export"]["layers"] == first["export"]["layers"]


def test_changed_config_in_an_existing_workdir_is_an_error_not_a_silent_reuse(data_dir, tmp_path):
  config = tiny_config("digits", data_dir, stages="fp,ptq,efqat")
  first = stages.run_pipeline(config, tmp_path)
  config.eval_batch_size = 256  # not an input of any checkpoint: reuse is fine
  assert stages.run_pipeline(config, tmp_path) == first
  for field, value in (("efqat.rho", 0.5), ("fp.steps", 3), ("quant.act_bits", 8)):
    changed = config.copy_and_resolve_references()
    section, name = field.split(".")
    changed[section][name] = value
    with pytest.raises(ValueError, match=rf"changed: config\.{field}"):
      stages.run_pipeline(changed, tmp_path)
  assert json.loads((tmp_path / "results.json").read_text()) == first  # nothing lost
  assert stages.run_pipeline(config, tmp_path) == first
