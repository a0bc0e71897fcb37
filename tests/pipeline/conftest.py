"""Tiny pipeline configs on the bundled datasets (a few steps each)."""

import pytest

from efqat_jax.config import base_config

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


@pytest.fixture
def tiny():
  return tiny_config


def faults_config(data_dir, **overrides):
  """Digits, every stage, checkpoints every 2 steps: fp 4 steps, efqat 5 (re-selects at 3)."""
  config = tiny_config("digits", data_dir, checkpoint_every=2, **overrides)
  config.fp.steps, config.efqat.steps, config.efqat.reselect_every = 4, 5, 3
  return config


@pytest.fixture(scope="session")
def finished(data_dir, tmp_path_factory):
  """``(config, workdir, results)`` of one finished run of every stage; copy it to change it."""
  from efqat_jax import pipeline

  workdir = tmp_path_factory.mktemp("finished")
  config = faults_config(data_dir)
  return config, workdir, pipeline.run_pipeline(config, workdir)
