"""Re-selection during training: when it happens, what it installs, and reading it back."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efqat_jax import QuantRule, QuantSpec, quantize
from efqat_jax.efqat import (
  ReselectingStep,
  freeze_unselected,
  select,
  set_trainable,
  trainable_from_state,
)
from efqat_jax.models import SmallCNN
from efqat_jax.train import create_train_state
from tests.built_model import BuiltModel

RULE = QuantRule(".*", weight=QuantSpec.for_weights(4), input=QuantSpec.for_activations(4))
MODEL = quantize(SmallCNN(features=(8, 16)), RULE)  # Conv_0 (8), Conv_1 (16), Dense_0 (10)
CNN = BuiltModel(MODEL, jnp.ones((2, 12, 12, 1)))
TX = freeze_unselected(optax.adam(1e-2))


def _state():
  return create_train_state(CNN.variables, TX)


class Recorder:
  """A stand-in train step that records the selection it gets and scales Conv_1's kernel so
  that its channels' ranking flips (changing what cwpn selects)."""

  def __init__(self):
    self.seen = []

  def __call__(self, state, batch, rng, trainable):
    self.seen.append(trainable)
    params = jax.tree_util.tree_map_with_path(
      lambda p, v: -v * 3 if "Conv_1" in str(p) and p[-1].key == "kernel" else v, state.params
    )
    return state.replace(step=state.step + 1, params=params), {}


def _run(step, state, steps):
  for _ in range(steps):
    state, _ = step(state, None, None)
  return state


@pytest.mark.parametrize("every, selections", [(2, [0, 2, 4]), (None, [0])])
def test_selects_at_step_zero_and_every_so_many_steps(every, selections):
  calls = []
  recorder = Recorder()
  step = ReselectingStep(
    recorder,
    lambda v: select(v["params"], CNN.layers, "cwpl", 0.25),
    every,
    lambda *a: calls.append(a[0]),
  )
  _run(step, _state(), 5)
  assert calls == selections
  assert len(recorder.seen) == 5 and all(t is not None for t in recorder.seen)


def test_selection_is_installed_in_the_optimizer_state():
  step = ReselectingStep(Recorder(), lambda v: select(v["params"], CNN.layers, "cwpl", 0.25), None)
  state = _run(step, _state(), 1)
  masks = state.opt_state.masks["Conv_1"]["kernel"]
  assert masks.shape == (3, 3, 8, 16) and int(masks[0, 0, 0].sum()) == 4
  np.testing.assert_array_equal(masks, np.broadcast_to(masks[0, 0, 0], masks.shape))


def test_recompiles_are_flagged_only_for_counts_not_seen_before():
  flags = []
  step = ReselectingStep(
    Recorder(),
    lambda v: select(v["params"], CNN.layers, "cwpn", 0.3),
    1,
    lambda *a: flags.append(a[3]),
  )
  _run(step, _state(), 4)
  assert flags[0] is True
  assert sum(flags) == len(step.compiled_counts)


@pytest.mark.parametrize("mode, rho", [("cwpl", 0.3), ("cwpn", 0.2), ("lwpn", 0.5), ("ptq", 0)])
@pytest.mark.parametrize("train_frozen_scales", [False, True])
def test_selection_reads_back_from_the_optimizer_state(mode, rho, train_frozen_scales):
  state = _state()
  chosen = select(state.params, CNN.layers, mode, rho, train_frozen_scales=train_frozen_scales)
  opt_state = set_trainable(state.opt_state, state.params, chosen)
  back = trainable_from_state(opt_state, state.params, CNN.layers)
  assert back.counts == chosen.counts and back.layers == chosen.layers
  partial = any(k < chosen.size(unit) for unit, k in chosen.counts)
  expect_flag = train_frozen_scales and partial
  assert back.train_frozen_scales == expect_flag
  for path in chosen.channels:
    assert set(np.asarray(back.channels[path])) == set(np.asarray(chosen.channels[path]))


def test_a_resumed_run_between_selections_continues_with_the_installed_selection():
  straight = Recorder()
  _run(
    ReselectingStep(straight, lambda v: select(v["params"], CNN.layers, "cwpn", 0.3), 3),
    _state(),
    5,
  )
  first = Recorder()
  state = _run(
    ReselectingStep(first, lambda v: select(v["params"], CNN.layers, "cwpn", 0.3), 3), _state(), 2
  )
  resumed = Recorder()  # a new process: resumes at step 2 (no selection due until step 3)
  _run(
    ReselectingStep(resumed, lambda v: select(v["params"], CNN.layers, "cwpn", 0.3), 3), state, 3
  )
  for a, b in zip(straight.seen, first.seen + resumed.seen, strict=True):
    assert a.counts == b.counts
    for path in a.channels:
      assert set(np.asarray(a.channels[path])) == set(np.asarray(b.channels[path]))


def test_summary_counts_channel_and_parameter_shares():
  params = _state().params
  chosen = select(params, CNN.layers, "lwpn", 0.3)  # one of three layers, trained whole
  summary = chosen.summary()
  (trained,) = [p for p, k in chosen.counts if k]
  sizes = {p: np.size(params[p]["kernel"]) for p in ("Conv_0", "Conv_1", "Dense_0")}
  channels = {"Conv_0": 8, "Conv_1": 16, "Dense_0": 10}
  assert summary["channel_fraction"] == pytest.approx(channels[trained] / 34)
  assert summary["param_fraction"] == pytest.approx(sizes[trained] / sum(sizes.values()))
  assert summary[f"{trained}/param_fraction"] == summary[f"{trained}/channel_fraction"] == 1.0


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_bad_period_is_rejected(every):
  with pytest.raises(ValueError, match="every must be"):
    ReselectingStep(Recorder(), lambda v: select(v["params"], CNN.layers, "cwpl"), every)


def test_reselecting_with_unchanged_counts_never_retraces_the_step():
  """cwpl keeps every layer's count, so re-selecting (every other step) reuses one trace."""
  from efqat_jax.efqat import restrict_backward
  from efqat_jax.train import (
    classification_loss,
    make_mesh,
    make_train_step,
    replicate,
    shard_batch,
  )

  mesh = make_mesh()
  traced_once = chex.assert_max_traces(classification_loss, n=1)  # runs once per trace
  train_step = make_train_step(MODEL, TX, mesh, traced_once, param_context=restrict_backward)
  step = ReselectingStep(train_step, lambda v: select(v["params"], CNN.layers, "cwpl", 0.25), 2)
  x = jax.random.uniform(jax.random.key(1), (8, 12, 12, 1))
  batch = shard_batch({"inputs": x, "labels": jnp.arange(8) % 10}, mesh)
  state = replicate(_state(), mesh)
  for i in range(4):
    state, _ = step(state, batch, jax.random.key(i))
  assert len(step.compiled_counts) == 1
  assert (
    step.step_fn.jitted._cache_size() == 1
  )  # new masks keep the state's placement: no recompile
  with pytest.raises(AssertionError, match="traced"):  # new counts: the same step retraces
    step.step_fn(state, batch, jax.random.key(9), select(state.params, CNN.layers, "lwpn", 0.5))


def test_a_real_reselection_stops_newly_frozen_channels_and_trains_newly_selected_ones():
  """A real train step over a selection change: channels frozen at step 2 stop at once and keep
  their Adam moments; channels selected at step 2 (frozen before) start to move."""
  from efqat_jax.efqat import TrainableSet, restrict_backward
  from efqat_jax.train import make_mesh, make_train_step, replicate, shard_batch

  mesh = make_mesh()
  ranked = select(CNN.variables["params"], CNN.layers, "cwpl", 1.0)  # every channel, by importance
  k = {unit: c // 4 for unit, c in ((u, ranked.size(u)) for u, _ in ranked.counts)}
  top = {unit: ranked.channels[unit][: k[unit]] for unit in k}
  bottom = {unit: ranked.channels[unit][-k[unit] :] for unit in k}
  counts = tuple(sorted(k.items()))
  selections = iter(
    [TrainableSet(counts, ranked.layers, top), TrainableSet(counts, ranked.layers, bottom)]
  )
  step = ReselectingStep(
    make_train_step(MODEL, TX, mesh, param_context=restrict_backward), lambda p: next(selections), 2
  )
  x = jax.random.uniform(jax.random.key(1), (8, 12, 12, 1))
  batch = shard_batch({"inputs": x, "labels": jnp.arange(8) % 10}, mesh)
  state = replicate(_state(), mesh)
  snapshots = [jax.device_get(state)]
  for i in range(4):
    state, _ = step(state, batch, jax.random.key(i))
    snapshots.append(jax.device_get(state))
  assert step.step_fn.jitted._cache_size() == 1  # same counts: the new selection is data
  s0, s2, s4 = snapshots[0], snapshots[2], snapshots[4]
  mu = lambda s, unit: optax.tree_utils.tree_get(s.opt_state.inner, "mu")[unit]["kernel"]
  for unit in k:
    newly_frozen = np.setdiff1d(np.asarray(top[unit]), np.asarray(bottom[unit]))
    newly_trained = np.setdiff1d(np.asarray(bottom[unit]), np.asarray(top[unit]))
    kernel = lambda s, unit=unit: np.asarray(s.params[unit]["kernel"])
    np.testing.assert_array_equal(kernel(s4)[..., newly_frozen], kernel(s2)[..., newly_frozen])
    np.testing.assert_array_equal(
      np.asarray(mu(s4, unit))[..., newly_frozen], np.asarray(mu(s2, unit))[..., newly_frozen]
    )
    assert np.any(np.asarray(mu(s2, unit))[..., newly_frozen] != 0)  # moments exist and stay
    np.testing.assert_array_equal(kernel(s2)[..., newly_trained], kernel(s0)[..., newly_trained])
    moved = kernel(s4)[..., newly_trained] != kernel(s2)[..., newly_trained]
    assert np.all(np.any(moved.reshape(-1, len(newly_trained)), axis=0)), unit
