"""Step shapes: a re-selection that fits a step compiled earlier runs it, padded; the result is
the selection's, and a resumed run picks the same step as an uninterrupted one."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efqat_jax.efqat import ReselectingStep, TrainableSet, restrict_backward, select
from efqat_jax.efqat.step_shapes import StepShapes, dominates, gradient_size, padded_to
from efqat_jax.train import (
  Checkpointer,
  MetricWriter,
  create_train_state,
  make_mesh,
  make_train_step,
  replicate,
  shard_batch,
  train_loop,
)
from tests.efqat.test_reselect import CNN, MODEL, TX

# Every channel, by importance (built while collecting: the selections below need it).
RANKED = select(CNN.params, CNN.layers, "cwpl", 1.0)
UNITS = ("Conv_0", "Conv_1", "Dense_0")  # 8, 16 and 10 output channels


def _selection(counts: tuple[int, int, int], start: int = 0) -> TrainableSet:
  """Counts for (Conv_0, Conv_1, Dense_0), the channels ranked ``start`` on."""
  channels = {u: RANKED.channels[u][start : start + k] for u, k in zip(UNITS, counts, strict=True)}
  return TrainableSet(tuple(zip(UNITS, counts, strict=True)), RANKED.layers, channels)


A = _selection((4, 8, 2))  # the first selection
D = _selection((2, 12, 2), start=3)  # Conv_1 grows: only a new compilation serves it
E = _selection((3, 6, 0), start=1)  # fits A (not D, Conv_0 2 < 3); Dense_0 frozen


def test_the_cheapest_dominating_shape_serves_and_only_new_counts_are_added():
  shapes = StepShapes()
  assert shapes.choose(A) == A.counts and shapes.choose(D) == D.counts
  assert shapes.choose(E) == A.counts and shapes.used == [A.counts, D.counts]
  small = _selection((1, 4, 1))  # fits both: A computes fewer weight gradients than D
  assert gradient_size(small, A.counts) < gradient_size(small, D.counts)
  assert shapes.choose(small) == A.counts == shapes.current
  assert not dominates(D.counts, E.counts) and dominates(A.counts, A.counts)
  assert not dominates(A.counts[:2], A.counts[:2] + (("Dense_1", 0),))  # other units
  plain = StepShapes(reuse=False)
  assert [plain.choose(s) for s in (A, E, A)] == [A.counts, E.counts, A.counts]
  assert plain.used == [A.counts, E.counts]
  back = StepShapes.from_json(json.loads(json.dumps(shapes.to_json())), reuse=True)
  assert back == shapes


def test_padding_fills_each_unit_to_the_shape_with_the_no_channel_index():
  padded = padded_to(E, A.counts)
  assert padded.counts == A.counts and padded.layers == E.layers
  for unit, k in A.counts:
    own = np.asarray(E.channels[unit])
    np.testing.assert_array_equal(padded.channels[unit][: len(own)], own)
    np.testing.assert_array_equal(padded.channels[unit][len(own) :], E.size(unit))
    assert len(padded.channels[unit]) == k
  with pytest.raises(ValueError, match="cannot serve"):
    padded_to(D, A.counts)


MESH = make_mesh()
X = jax.random.uniform(jax.random.key(1), (16, 12, 12, 1))
STEPS, EVERY = 6, 2
SCHEDULE = {0: A, 2: D, 4: E}  # the selection due at each step


def _batches(start, now):
  """Batches from step ``start`` on; ``now[0]`` is the step of the batch last handed out (the
  selector reads it)."""
  for step in range(start, STEPS):
    now[0] = step
    i = step % 2 * 8
    yield shard_batch({"inputs": X[i : i + 8], "labels": jnp.arange(i, i + 8) % 10}, MESH)


def _train(workdir, train_step, steps, reuse=True):
  """Runs (or resumes) ``steps`` steps in ``workdir``; returns the final state and the step."""
  now = [0]
  # on resuming between selections the selector is asked only for the layers
  selector = lambda variables: SCHEDULE.get(now[0], A)
  step = ReselectingStep(train_step, selector, EVERY, reuse_steps=reuse)
  state = replicate(create_train_state(CNN.variables, TX), MESH)
  with Checkpointer(workdir / "ckpt") as ckpt, MetricWriter(workdir / "tb") as writer:
    state = train_loop(
      state,
      step,
      lambda start: _batches(start, now),
      steps,
      checkpointer=ckpt,
      writer=writer,
      rng=jax.random.key(3),
      checkpoint_every=100,
      progress=False,
    )
  return jax.device_get(state), step


def test_a_padded_step_trains_the_selection_and_a_resumed_run_picks_the_same_step(tmp_path):
  train_step = make_train_step(MODEL, TX, MESH, param_context=restrict_backward)
  straight, step = _train(tmp_path / "straight", train_step, STEPS)
  assert step.step_trainable.counts == A.counts and step.trainable.counts == E.counts
  assert step.compiled_counts == {A.counts, D.counts}
  assert train_step.jitted._cache_size() == 2  # E ran on A's step

  plain, plain_step = _train(
    tmp_path / "plain", make_train_step(MODEL, TX, MESH, param_context=restrict_backward), STEPS,
    reuse=False,
  )  # fmt: skip
  assert plain_step.compiled_counts == {A.counts, D.counts, E.counts}
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), straight.params,
    plain.params,
  )  # fmt: skip

  for resume_at in (4, 5):  # at E's selection, and between it and the next
    before, _ = _train(tmp_path / f"resume_{resume_at}", train_step, resume_at)
    resumed, step = _train(tmp_path / f"resume_{resume_at}", train_step, STEPS)  # a new process
    assert step.step_trainable.counts == A.counts and step.compiled_counts == {A.counts}
    jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, straight.opt_state)
    if resume_at == 4:  # E freezes Dense_0: its padded step computes no update for it
      np.testing.assert_array_equal(
        straight.params["Dense_0"]["kernel"], before.params["Dense_0"]["kernel"]
      )
