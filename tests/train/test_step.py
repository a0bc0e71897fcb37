"""Jitted data-parallel train and eval steps."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from efqat_jax import QuantRule, QuantSpec, quantize
from efqat_jax.models import SmallCNN
from efqat_jax.train import (
  create_train_state,
  cross_entropy,
  make_eval_step,
  make_mesh,
  make_train_step,
  replicate,
  shard_batch,
)

W4A4 = QuantRule(".*", weight=QuantSpec.for_weights(4), input=QuantSpec.for_activations(4))
X = jax.random.uniform(jax.random.key(0), (8, 12, 12, 1))
Y = jnp.arange(8) % 10


def _setup(model, tx=None):
  tx = tx or optax.adam(1e-2)
  mesh = make_mesh()
  state = replicate(create_train_state(jax.jit(model.init)(jax.random.key(0), X), tx), mesh)
  return mesh, tx, state


def test_train_step_lowers_the_loss_of_a_quantized_model():
  model = quantize(SmallCNN(features=(8, 16)), W4A4)
  mesh, tx, state = _setup(model)
  step = make_train_step(model, tx, mesh)
  batch = shard_batch({"inputs": X, "labels": Y}, mesh)
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.05
  assert int(state.step) == 8


def test_step_is_traced_once_across_steps():
  model = quantize(SmallCNN(features=(8,)), W4A4)
  mesh, tx, state = _setup(model)
  step = make_train_step(model, tx, mesh)
  batch = shard_batch({"inputs": X, "labels": Y}, mesh)
  for i in range(3):
    state, _ = step(state, batch, jax.random.key(i))
  assert step.jitted._cache_size() == 1


def test_padded_examples_do_not_count():
  model = SmallCNN(features=(8,))
  mesh, _, state = _setup(model)
  evaluate = make_eval_step(model, mesh)
  padded = {
    "inputs": X.at[6:].set(99.0),
    "labels": Y.at[6:].set(0),
    "mask": jnp.arange(8) < 6,
  }
  metrics = evaluate(state, shard_batch(padded, mesh))
  logits = model.apply(state.variables, X[:6])
  np.testing.assert_allclose(metrics["loss"], cross_entropy(logits, Y[:6]), rtol=1e-5)
  assert int(metrics["count"]) == 6
  assert set(metrics) == {"loss", "accuracy", "count"}  # classification_loss, the default


class BatchNormNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    return nn.Dense(10)(nn.relu(x).mean(axis=(1, 2)))


def test_batch_stats_are_updated_by_train_steps_and_used_by_eval():
  model = quantize(BatchNormNet(), W4A4)
  mesh, tx, state = _setup(model)
  collections = set(state.collections)
  before = np.asarray(state.collections["batch_stats"]["BatchNorm_0"]["mean"])
  state, _ = make_train_step(model, tx, mesh)(
    state, shard_batch({"inputs": X, "labels": Y}, mesh), jax.random.key(0)
  )
  after = state.collections["batch_stats"]["BatchNorm_0"]["mean"]
  assert not np.allclose(before, after)
  assert set(state.collections) == collections  # no collection added or dropped


EIGHT_DEVICES = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np, optax
  from efqat_jax import QuantRule, QuantSpec, quantize
  from efqat_jax.models import SmallCNN
  from efqat_jax.train import *
  assert jax.device_count() == 8, jax.devices()
  rule = QuantRule(".*", weight=QuantSpec.for_weights(4), input=QuantSpec.for_activations(4))
  model = quantize(SmallCNN(features=(8, 16)), rule)
  x = jax.random.uniform(jax.random.key(0), (16, 12, 12, 1))
  y = jnp.arange(16) % 10
  tx = optax.sgd(0.1, momentum=0.9)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = make_mesh(devices)
    state = replicate(create_train_state(model.init(jax.random.key(0), x), tx), mesh)
    step = make_train_step(model, tx, mesh)
    for i in range(3):
      state, metrics = step(state, shard_batch({"inputs": x, "labels": y}, mesh), jax.random.key(i))
    results.append((float(metrics["loss"]), jax.device_get(state.params)))
  (loss1, params1), (loss8, params8) = results
  np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params1, params8)
  try:
    shard_batch({"inputs": np.zeros((12, 2))}, make_mesh())
    raise AssertionError("a batch of 12 on 8 devices was accepted")
  except ValueError as e:
    assert "batch['inputs']" in str(e) and "8 devices" in str(e), e
  print("match", loss1, loss8)
  """
)


def test_eight_simulated_devices_match_one_device_and_reject_indivisible_batches():
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", EIGHT_DEVICES], env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "match" in result.stdout


class Normed(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3)(nn.BatchNorm(use_running_average=not train)(x))


def test_a_loss_owns_the_collections_it_asks_for_and_may_run_with_edited_params():
  model = Normed()
  x = jax.random.normal(jax.random.key(0), (6, 4)) + 5.0
  mesh, tx = make_mesh(), optax.sgd(0.0)
  state = replicate(create_train_state(model.init(jax.random.key(1), x), tx), mesh)
  seen = {}

  def loss_fn(apply, batch, rng, train):
    out, mine = apply(batch["inputs"], train=True, mutable=["params"])  # stats still kept
    zeroed = lambda p: jax.tree.map(jnp.zeros_like, p)
    _, everything = apply(batch["inputs"] * 3, train=True, mutable=True, edit_params=zeroed)
    seen.update(params=set(mine), all=set(everything))
    edited = apply(batch["inputs"], edit_params=zeroed)
    return jnp.mean(out**2) + jnp.mean(edited**2), {"edited": jnp.abs(edited).max()}

  step = make_train_step(model, tx, mesh, loss_fn)
  new, metrics = step(state, {"inputs": x}, jax.random.key(2))
  assert seen == {"params": {"params"}, "all": {"params", "batch_stats"}}
  assert float(metrics["edited"]) == 0.0  # zero kernel and bias: zero output
  # The running mean moved toward the first call's batch mean only (the second, 3x, is not kept).
  expected = 0.01 * np.asarray(x).mean(0)  # momentum 0.99 from a zero mean
  np.testing.assert_allclose(
    new.collections["batch_stats"]["BatchNorm_0"]["mean"], expected, rtol=1e-5
  )
