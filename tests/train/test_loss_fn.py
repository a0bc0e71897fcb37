"""Train and eval steps over a user loss: any model signature, param contexts, no aliasing."""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efqat_jax.train import (
  create_train_state,
  cross_entropy,
  make_eval_step,
  make_mesh,
  make_train_step,
  replicate,
  shard_batch,
)

X = jax.random.normal(jax.random.key(0), (8, 6))
Y = jnp.arange(8) % 3
MESH = make_mesh()


class DeterministicNet(nn.Module):
  """Called as ``model(x, deterministic=...)`` (the Flax convention for dropout)."""

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = nn.Dropout(0.2)(nn.relu(nn.Dense(16)(x)), deterministic=deterministic)
    return nn.Dense(3)(x)


class PlainNet(nn.Module):
  """No train/deterministic flag at all."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))


class TwoInputNet(nn.Module):
  """Called as ``model(a, b)``."""

  @nn.compact
  def __call__(self, a, b):
    return nn.Dense(1)(nn.relu(nn.Dense(16)(a) + nn.Dense(16)(b)))[:, 0]


class BatchNormDropoutNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Dense(16)(x))
    x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


class Tower(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Dense(8)(x))
    return nn.Dense(4)(nn.relu(x))


class TwoTowers(nn.Module):
  """A query and a key tower, applied one at a time (``method=``) by the loss."""

  def setup(self):
    self.query, self.key = Tower(), Tower()

  def __call__(self, a, b, train: bool = False):
    return self.embed_query(a, train) @ self.embed_key(b, train).T

  def embed_query(self, a, train: bool = False):
    return self.query(a, train)

  def embed_key(self, b, train: bool = False):
    return self.key(b, train)


def _checked(rng, train):
  """The loss gets the step's key and ``train=True`` in training, None and False in eval."""
  assert isinstance(train, bool)
  assert (rng is not None) == train, (rng, train)


def deterministic_loss(apply, batch, rng, train):
  _checked(rng, train)
  rngs = {"dropout": rng} if train else None
  logits = apply(batch["x"], deterministic=not train, rngs=rngs)
  return cross_entropy(logits, batch["y"]), {"logit_mean": logits.mean()}


def regression_loss(apply, batch, rng, train):
  _checked(rng, train)
  error = apply(batch["x"]).sum(-1) - batch["target"]
  return jnp.mean(error**2), {"mae": jnp.mean(jnp.abs(error))}


def two_input_loss(apply, batch, rng, train):
  _checked(rng, train)
  error = apply(batch["a"], batch["b"]) - batch["target"]
  return jnp.mean(error**2), {}


def batch_norm_loss(apply, batch, rng, train):
  _checked(rng, train)
  logits = apply(batch["x"], train=train, rngs={"dropout": rng} if train else None)
  return cross_entropy(logits, batch["y"]), {}


def contrastive_loss(apply, batch, rng, train):
  """Each query matches the key of the same row: two applies, each updating its tower's stats."""
  _checked(rng, train)
  queries = apply(batch["a"], train=train, method="embed_query")
  keys = apply(batch["b"], train=train, method="embed_key")
  logits = queries @ keys.T
  return cross_entropy(logits, jnp.arange(logits.shape[0])), {}


def _state(model, tx, *inputs):
  variables = jax.jit(model.init)(jax.random.key(1), *inputs)
  return replicate(create_train_state(variables, tx), MESH)


def _losses(model, loss_fn, batch, inputs, steps=15, tx=None):
  tx = tx or optax.adam(3e-2)
  state = _state(model, tx, *inputs)
  step = make_train_step(model, tx, MESH, loss_fn)
  batch = shard_batch(batch, MESH)
  losses = []
  for i in range(steps):
    state, metrics = step(state, batch, jax.random.key(i))
    losses.append(float(metrics["loss"]))
  return state, metrics, losses


TARGET = X.sum(-1)


@pytest.mark.parametrize(
  "model, loss_fn, batch, inputs, metric",
  [
    (DeterministicNet(), deterministic_loss, {"x": X, "y": Y}, (X,), "logit_mean"),
    (PlainNet(), regression_loss, {"x": X, "target": TARGET}, (X,), "mae"),
    (TwoInputNet(), two_input_loss, {"a": X, "b": X[::-1], "target": TARGET}, (X, X), None),
  ],
  ids=["deterministic_flag", "no_flag", "two_inputs"],
)
def test_custom_loss_trains_models_of_any_signature(model, loss_fn, batch, inputs, metric):
  state, metrics, losses = _losses(model, loss_fn, batch, inputs)
  assert losses[-1] < 0.7 * losses[0], losses
  assert set(metrics) == {"loss"} | ({metric} if metric else set())
  assert int(state.step) == len(losses) and not state.collections


def test_batch_norm_and_dropout_model_updates_its_stats_and_uses_the_step_rng():
  model, batch = BatchNormDropoutNet(), {"x": X, "y": Y}
  tx = optax.sgd(0.1)
  before = _state(model, tx, X).collections["batch_stats"]["BatchNorm_0"]["mean"]
  state, _, losses = _losses(model, batch_norm_loss, batch, (X,))
  assert losses[-1] < losses[0]
  assert not np.allclose(state.collections["batch_stats"]["BatchNorm_0"]["mean"], before)

  step = make_train_step(model, tx, MESH, batch_norm_loss)
  sharded = shard_batch(batch, MESH)
  loss = lambda key: float(step(_state(model, tx, X), sharded, jax.random.key(key))[1]["loss"])
  assert loss(0) == loss(0) != loss(1)  # dropout masks come from the rng, reproducibly


def test_loss_that_applies_the_model_twice_keeps_both_updates():
  model = TwoTowers()
  a, b = X, X[::-1] + 0.1
  tx = optax.adam(3e-2)
  init = _state(model, tx, a, b).collections["batch_stats"]
  state, _, losses = _losses(model, contrastive_loss, {"a": a, "b": b}, (a, b), steps=10)
  assert losses[-1] < losses[0]
  stats = state.collections["batch_stats"]
  for tower in ("query", "key"):
    mean = stats[tower]["BatchNorm_0"]["mean"]
    assert not np.allclose(mean, init[tower]["BatchNorm_0"]["mean"]), tower


def test_eval_step_runs_a_custom_loss_without_rng_and_counts_examples():
  model, tx = PlainNet(), optax.sgd(0.1)
  state = _state(model, tx, X)
  batch = {"x": X, "target": TARGET}
  metrics = make_eval_step(model, MESH, regression_loss)(state, shard_batch(batch, MESH))
  error = model.apply(state.variables, X).sum(-1) - TARGET
  assert set(metrics) == {"loss", "mae", "count"}
  np.testing.assert_allclose(metrics["loss"], jnp.mean(error**2), rtol=1e-5)
  np.testing.assert_allclose(metrics["mae"], jnp.mean(jnp.abs(error)), rtol=1e-5)
  assert int(metrics["count"]) == 8

  evaluate = make_eval_step(DeterministicNet(), MESH, deterministic_loss)
  masked = shard_batch({"x": X, "y": Y, "mask": jnp.arange(8) < 5}, MESH)
  assert int(evaluate(_state(DeterministicNet(), tx, X), masked)["count"]) == 5


def _kernels(state):
  params = jax.device_get(state.params)
  return params["Dense_0"]["kernel"], params["Dense_1"]["kernel"]


def test_param_context_yields_the_params_of_the_forward_pass():
  calls = []

  @contextlib.contextmanager
  def freeze_first(params, extra):
    calls.append(extra)
    frozen = jax.lax.stop_gradient(params["Dense_0"]["kernel"])
    yield {**params, "Dense_0": {**params["Dense_0"], "kernel": frozen}}

  model, tx = PlainNet(), optax.sgd(0.1)
  state = _state(model, tx, X)
  first, second = _kernels(state)
  step = make_train_step(model, tx, MESH, regression_loss, param_context=freeze_first)
  state, _ = step(state, shard_batch({"x": X, "target": TARGET}, MESH), jax.random.key(0))
  new_first, new_second = _kernels(state)
  np.testing.assert_array_equal(new_first, first)  # no gradient through the frozen kernel
  assert not np.allclose(new_second, second)
  assert calls == [None]  # entered once, when the step was traced


def test_param_context_receives_the_steps_extra_argument():
  @contextlib.contextmanager
  def scale_last(params, scale):
    yield {
      **params,
      "Dense_1": {**params["Dense_1"], "kernel": params["Dense_1"]["kernel"] * scale},
    }

  model, tx = DeterministicNet(), optax.sgd(0.0)
  state = _state(model, tx, X)
  step = make_train_step(model, tx, MESH, deterministic_loss, param_context=scale_last)
  batch, key = shard_batch({"x": X, "y": Y}, MESH), jax.random.key(0)
  state, metrics = step(state, batch, key, jnp.float32(0.0))
  np.testing.assert_allclose(metrics["loss"], np.log(3), rtol=1e-6)  # zero logits
  _, metrics = step(state, batch, key, jnp.float32(1.0))
  assert abs(float(metrics["loss"]) - np.log(3)) > 1e-3


def test_extra_argument_without_param_context_is_an_error():
  model, tx = PlainNet(), optax.sgd(0.1)
  step = make_train_step(model, tx, MESH, regression_loss)
  batch = shard_batch({"x": X, "target": TARGET}, MESH)
  with pytest.raises(ValueError, match="param_context"):
    step(_state(model, tx, X), batch, jax.random.key(0), jnp.ones(()))


def test_donating_step_leaves_the_callers_variables_usable_and_unchanged():
  model, tx = PlainNet(), optax.adam(1e-2)
  variables = model.init(jax.random.key(1), X)
  saved = jax.tree.map(np.array, variables)
  state = replicate(create_train_state(variables, tx), MESH)
  step = make_train_step(model, tx, MESH, regression_loss)
  state, _ = step(state, shard_batch({"x": X, "target": TARGET}, MESH), jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), saved)
  model.apply(variables, X)  # "Array has been deleted" if the state aliased them
  assert not np.allclose(state.params["Dense_0"]["kernel"], saved["params"]["Dense_0"]["kernel"])
