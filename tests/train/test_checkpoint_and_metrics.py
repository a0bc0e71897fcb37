"""Orbax checkpoints of a TrainState and TensorBoard event files."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efqat_jax import QuantRule, QuantSpec, quantize
from efqat_jax.models import SmallCNN
from efqat_jax.train import (
  Checkpointer,
  MetricWriter,
  create_train_state,
  make_mesh,
  make_train_step,
  read_scalars,
  replicate,
  shard_batch,
)

X = jax.random.uniform(jax.random.key(0), (8, 12, 12, 1))
Y = jnp.arange(8) % 10
RULE = QuantRule(".*", weight=QuantSpec.for_weights(4), input=QuantSpec.for_activations(4))


def _train(state, step, batch, steps, start=0):
  for i in range(start, steps):
    state, _ = step(state, batch, jax.random.key(i))
  return state


def test_resume_from_checkpoint_reaches_the_uninterrupted_result(tmp_path):
  model = quantize(SmallCNN(features=(8,)), RULE)
  tx = optax.adamw(1e-2, weight_decay=1e-3)
  mesh = make_mesh()
  fresh = lambda: replicate(create_train_state(model.init(jax.random.key(0), X), tx), mesh)
  step = make_train_step(model, tx, mesh)
  batch = shard_batch({"inputs": X, "labels": Y}, mesh)
  uninterrupted = _train(fresh(), step, batch, 6)

  with Checkpointer(tmp_path / "ckpt") as ckpt:
    state = _train(fresh(), step, batch, 3)
    ckpt.save(int(state.step), state, wait=True)
    # ... the process dies here; a new one restores and continues
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.latest_step() == 3
    resumed = ckpt.restore_latest(fresh())
    assert int(resumed.step) == 3
    resumed = _train(resumed, step, batch, 6, start=3)
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(uninterrupted)
  )


def test_restore_without_checkpoint_returns_the_given_state(tmp_path):
  state = {"w": jnp.ones(3)}
  with Checkpointer(tmp_path / "empty") as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.restore_latest(state) is state


def test_checkpointer_keeps_the_last_n(tmp_path):
  with Checkpointer(tmp_path / "c", max_to_keep=2) as ckpt:
    for s in (1, 2, 3):
      ckpt.save(s, {"w": jnp.full(2, float(s))}, wait=True)
    assert ckpt.latest_step() == 3
    restored = ckpt.restore_latest({"w": jnp.zeros(2)})
  np.testing.assert_array_equal(restored["w"], [3.0, 3.0])
  assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.name.isdigit()) == ["2", "3"]
  with pytest.raises(ValueError, match="max_to_keep"):
    Checkpointer(tmp_path / "d", max_to_keep=0)


def test_metric_writer_writes_event_files_that_read_back(tmp_path):
  with MetricWriter(tmp_path / "tb") as writer:
    writer.write(1, {"loss": 2.5, "accuracy": 0.25})
    writer.write(2, {"loss": np.float32(1.5)})
  scalars = read_scalars(tmp_path / "tb")
  assert scalars["loss"] == [(1, 2.5), (2, 1.5)]
  assert scalars["accuracy"] == [(1, 0.25)]


def test_writers_opened_within_one_second_keep_each_others_events(tmp_path):
  for step in (1, 2):  # e.g. a run interrupted and resumed at once
    with MetricWriter(tmp_path / "tb") as writer:
      writer.write(step, {"loss": float(step)})
  assert read_scalars(tmp_path / "tb")["loss"] == [(1, 1.0), (2, 2.0)]
