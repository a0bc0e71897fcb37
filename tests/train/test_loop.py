"""train_loop: an interrupted run resumed from its checkpoint ends where an uninterrupted one does."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efqat_jax.errors import NonFiniteError
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
VARIABLES = jax.jit(MODEL.init)(jax.random.key(1), X[:BATCH])
STEP = make_train_step(MODEL, TX, MESH)


class Interrupted(Exception):
  pass


def batches_from(start, fail_at=None):
  """The batches from step ``start`` on, reshuffled every epoch (as ``pipeline.Run``'s are);
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


def _toy_run(tmp_path, bad_from, *, loss_bad, num_steps=8, checkpoint_every=2, log_every=8):
  """A scalar run whose step ``bad_from`` on (as logged) makes the loss NaN (``loss_bad``) or
  the params inf with a finite loss; returns the checkpointer's steps after it stops."""

  @jax.jit
  def step_fn(state, batch, rng):
    step = state.step + 1
    bad = step >= bad_from
    w = jnp.where(bad, jnp.nan if loss_bad else jnp.inf, state.params["w"] + batch)
    loss = jnp.sum(w) if loss_bad else jnp.float32(1.0)
    return state.replace(step=step, params={"w": w}), {"loss": loss}

  state = create_train_state({"params": {"w": jnp.zeros(3)}}, optax.identity())
  with (
    Checkpointer(tmp_path / "ckpt") as ckpt,
    MetricWriter(tmp_path / "tb") as writer,
    pytest.raises(NonFiniteError) as error,
  ):
    train_loop(
      state,
      step_fn,
      lambda start: itertools.repeat(jnp.float32(1.0)),
      num_steps,
      checkpointer=ckpt,
      writer=writer,
      rng=jax.random.key(0),
      checkpoint_every=checkpoint_every,
      log_every=log_every,
      description="toy",
      progress=False,
    )
  steps = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    for step in steps:  # every checkpoint left is finite
      assert np.isfinite(ckpt.read(step)["params"]["w"]).all()
  return str(error.value), steps


@pytest.mark.parametrize(
  "bad_from, checkpoint_every, log_every",
  [(4, 2, 8), (5, 2, 8), (3, 2, 1)],  # found at a save of that step, a later save, a log
)
def test_a_non_finite_loss_stops_naming_its_first_step_and_saves_nothing_from_it_on(
  bad_from, checkpoint_every, log_every, tmp_path
):
  message, steps = _toy_run(
    tmp_path, bad_from, loss_bad=True, checkpoint_every=checkpoint_every, log_every=log_every
  )
  assert "\n" not in message
  assert f"stage 'toy': the loss is non-finite at step {bad_from};" in message
  assert steps and max(steps) < bad_from
  assert f"last good checkpoint, step {max(steps)} " in message


def test_non_finite_params_with_a_finite_loss_are_never_saved(tmp_path):
  message, steps = _toy_run(tmp_path, 3, loss_bad=False)
  assert "stage 'toy': the parameters are non-finite at step 4" in message
  assert steps == [2]
