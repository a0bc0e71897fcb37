"""train_loop: an interrupted run resumed from its checkpoint ends where an uninterrupted one does."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from efqat_jax.train import (
  Checkpointer,
  MetricWriter,
  create_train_state,
  make_mesh,
  make_train_step,
  read_scalars,
  replicate,
  shard_batch,
  train_loop,
)

EXAMPLES, BATCH = 12, 4
STEPS_PER_EPOCH = EXAMPLES // BATCH
NUM_STEPS, CHECKPOINT_EVERY = 8, 2
X = np.asarray(jax.random.normal(jax.random.key(0), (EXAMPLES, 6)))
Y = np.arange(EXAMPLES) % 3
MESH = make_mesh()


class DropoutNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(16)(x)))
    return nn.Dense(3)(x)


MODEL, TX = DropoutNet(), optax.adamw(3e-2, weight_decay=1e-2)
VARIABLES = MODEL.init(jax.random.key(1), X[:BATCH])
STEP = make_train_step(MODEL, TX, MESH)


class Interrupted(Exception):
  pass


def batches_from(start, fail_at=None):
  """The batches from step ``start`` on, reshuffled every epoch (as ``stages.Run``'s are);
  raises Interrupted instead of yielding the batch of step ``fail_at``."""
  epoch, skip = divmod(start, STEPS_PER_EPOCH)
  step = start
  while True:
    order = np.random.default_rng([7, epoch]).permutation(EXAMPLES)
    for i in range(skip, STEPS_PER_EPOCH):
      if step == fail_at:
        raise Interrupted
      index = order[i * BATCH : (i + 1) * BATCH]
      yield shard_batch({"inputs": X[index], "labels": Y[index]}, MESH)
      step += 1
    epoch, skip = epoch + 1, 0


def _train(workdir, fail_in=None, fail_at=None):
  """Runs (or resumes) the loop in ``workdir``; ``fail_in`` ("step" or "data") interrupts it at
  step ``fail_at``."""

  def step_fn(state, batch, rng):
    if fail_in == "step" and int(state.step) == fail_at:
      raise Interrupted
    return STEP(state, batch, rng)

  data_fail = fail_at if fail_in == "data" else None
  state = replicate(create_train_state(VARIABLES, TX), MESH)
  with Checkpointer(workdir / "ckpt") as ckpt, MetricWriter(workdir / "tb") as writer:
    return train_loop(
      state,
      step_fn,
      lambda start: batches_from(start, data_fail),
      NUM_STEPS,
      checkpointer=ckpt,
      writer=writer,
      rng=jax.random.key(3),
      checkpoint_every=CHECKPOINT_EVERY,
      log_every=1,
      progress=False,
    )


@pytest.mark.parametrize("fail_in", ["step", "data"])
def test_interrupted_dropout_run_resumes_across_an_epoch_to_identical_params(fail_in, tmp_path):
  straight = jax.device_get(_train(tmp_path / "straight"))
  # killed at step 5 (epoch 1): it resumes from the checkpoint of step 4, mid-epoch, and goes
  # on through the start of epoch 2 at step 6
  with pytest.raises(Interrupted):
    _train(tmp_path / "resumed", fail_in, fail_at=5)
  with Checkpointer(tmp_path / "resumed" / "ckpt") as ckpt:
    assert ckpt.latest_step() == 4
  resumed = jax.device_get(_train(tmp_path / "resumed"))

  assert int(resumed.step) == int(straight.step) == NUM_STEPS
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  logged = dict(read_scalars(tmp_path / "resumed" / "tb")["loss"])
  expected = dict(read_scalars(tmp_path / "straight" / "tb")["loss"])
  assert logged == expected  # the steps after the checkpoint saw the same batches and rng


def test_dropout_makes_the_run_depend_on_its_rng(tmp_path):
  """Guards the test above: with dropout active, the rng really enters the result."""
  batch = next(batches_from(0))
  fresh = lambda: replicate(create_train_state(VARIABLES, TX), MESH)
  a = jax.device_get(STEP(fresh(), batch, jax.random.key(3))[0].params)
  b = jax.device_get(STEP(fresh(), batch, jax.random.key(4))[0].params)
  assert not np.allclose(a["Dense_0"]["kernel"], b["Dense_0"]["kernel"])
