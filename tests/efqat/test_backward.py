"""Layers without a trainable channel have no weight-gradient op in the compiled step."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efqat_jax import QuantRule, QuantSpec, quantize
from efqat_jax.efqat import freeze_unselected, select, set_trainable
from efqat_jax.models import SmallCNN
from efqat_jax.train import create_train_state, make_mesh, make_train_step, replicate, shard_batch

RULE = QuantRule(".*", weight=QuantSpec.for_weights(4), input=QuantSpec.for_activations(4))
MODEL = quantize(SmallCNN(features=(8, 16, 16)), RULE)  # Conv_0..2, Dense_0
X = jax.random.uniform(jax.random.key(0), (8, 12, 12, 1))
Y = jnp.arange(8) % 10


@pytest.fixture(scope="module")
def setup():
  mesh, tx = make_mesh(), freeze_unselected(optax.adam(1e-2))
  state = replicate(create_train_state(MODEL.init(jax.random.key(0), X), tx), mesh)
  return state, make_train_step(MODEL, tx, mesh), shard_batch({"inputs": X, "labels": Y}, mesh)


def _op_counts(step, state, batch, trainable):
  hlo = step.lower(state, batch, jax.random.key(0), trainable).compile().as_text()
  return len(re.findall(r" convolution\(", hlo)), len(re.findall(r" dot\(", hlo))


# Forward: 3 convolutions + 1 dot. Input gradients: every layer's (the first layer's input
# quantizer has a learnable scale, so the gradient reaches the model input): 3 + 1. Weight
# gradients: one per layer with a trainable channel.
@pytest.mark.parametrize(
  "mode, rho, convolutions, dots",
  [
    ("qat", 1.0, 3 + 3 + 3, 1 + 1 + 1),
    ("cwpl", 0.25, 3 + 3 + 3, 1 + 1 + 1),
    ("ptq", 0.0, 3 + 3 + 0, 1 + 1 + 0),
  ],
)
def test_compiled_step_has_weight_gradients_only_for_layers_that_train(
  setup, mode, rho, convolutions, dots
):
  state, step, batch = setup
  assert _op_counts(step, state, batch, select(state.params, mode, rho)) == (convolutions, dots)


def _backward_output_shapes(step, state, batch, trainable):
  """Sorted output shapes of the convolutions and dots that are not in the forward pass."""
  hlo = step.lower(state, batch, jax.random.key(0), trainable).compile().as_text()
  shapes = []
  for line in hlo.splitlines():
    found = re.search(r"= f32\[([0-9,]*)\][^=]* (?:convolution|dot)\(", line)
    forward = re.search(r'op_name="[^"]*jvp\(', line) and "transpose(" not in line
    if found and not forward:
      shapes.append(tuple(sorted(int(d) for d in found.group(1).split(","))))
  return shapes


def _weight_gradient(kernel_shape, k):
  """Sorted shape of the weight gradient of k output channels (XLA may permute its axes)."""
  return tuple(sorted((*kernel_shape[:-1], k)))


def test_partially_trained_layers_compute_weight_gradients_for_their_channels_only(setup):
  state, step, batch = setup
  trainable = select(state.params, "cwpl", 0.25)  # 8, 16, 16, 10 channels -> 2, 4, 4, 3
  shapes = _backward_output_shapes(step, state, batch, trainable)
  for path, k in trainable.counts:
    kernel = state.params[path]["kernel"].shape
    assert (k, kernel[-1]) in [(2, 8), (4, 16), (3, 10)], path
    assert _weight_gradient(kernel, k) in shapes, path
    assert _weight_gradient(kernel, kernel[-1]) not in shapes, path
  full = _backward_output_shapes(step, state, batch, select(state.params, "qat"))
  for path, value in state.params.items():
    assert _weight_gradient(value["kernel"].shape, value["kernel"].shape[-1]) in full, path


class GroupedConvs(nn.Module):
  """A depthwise and a grouped (2 groups) convolution, then a Dense head."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8)(x))  # depthwise
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=2)(x))  # grouped: full dW
    return nn.Dense(10)(x.mean(axis=(1, 2)))


@pytest.mark.parametrize(
  "model, mode, rho",
  [
    (MODEL, "cwpl", 0.25),
    (MODEL, "cwpn", 0.2),
    (MODEL, "lwpn", 0.5),
    (quantize(GroupedConvs(), RULE), "cwpl", 0.3),
  ],
)
def test_restricted_backward_updates_params_like_the_full_backward_with_masks(model, mode, rho):
  """The cheaper backward changes nothing but the work: one step with it equals a step with
  the full weight gradients and the same freezing masks."""
  mesh = make_mesh()
  tx = freeze_unselected(optax.adam(1e-2))
  state = replicate(create_train_state(model.init(jax.random.key(0), X), tx), mesh)
  trainable = select(state.params, mode, rho)
  state = state.replace(opt_state=set_trainable(state.opt_state, state.params, trainable))
  batch = shard_batch({"inputs": X, "labels": Y}, mesh)
  copy = lambda s: jax.tree.map(jnp.copy, s)
  step = make_train_step(model, tx, mesh)
  restricted, _ = step(copy(state), batch, jax.random.key(1), trainable)
  full, _ = step(copy(state), batch, jax.random.key(1), None)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    restricted.params,
    full.params,
  )


def test_lwpn_drops_the_weight_gradients_of_the_frozen_layers(setup):
  state, step, batch = setup
  trainable = select(state.params, "lwpn", 0.5)
  trained = {p for p, k in trainable.counts if k}
  conv_dw = sum(p.startswith("Conv") for p in trained)
  dense_dw = int("Dense_0" in trained)
  assert _op_counts(step, state, batch, trainable) == (6 + conv_dw, 2 + dense_dw)


def test_reselection_retraces_only_when_counts_change(setup):
  state, step, batch = setup
  tx = freeze_unselected(optax.adam(1e-2))
  mesh = make_mesh()
  state = replicate(create_train_state(MODEL.init(jax.random.key(0), X), tx), mesh)
  fresh = make_train_step(MODEL, tx, mesh)
  for i in range(3):
    trainable = select(state.params, "cwpl", 0.25)
    state = state.replace(opt_state=set_trainable(state.opt_state, state.params, trainable))
    state, _ = fresh(state, batch, jax.random.key(i), trainable)
  assert fresh._cache_size() == 1
  state, _ = fresh(state, batch, jax.random.key(9), select(state.params, "lwpn", 0.5))
  assert fresh._cache_size() == 2


def test_frozen_layer_params_do_not_move_through_the_full_step(setup):
  state, step, batch = setup
  tx = freeze_unselected(optax.adam(1e-2))
  mesh = make_mesh()
  state = replicate(create_train_state(MODEL.init(jax.random.key(0), X), tx), mesh)
  trainable = select(state.params, "lwpn", 0.5)
  state = state.replace(opt_state=set_trainable(state.opt_state, state.params, trainable))
  before = jax.device_get(state.params)
  state, _ = make_train_step(MODEL, tx, mesh)(state, batch, jax.random.key(0), trainable)
  for path, k in trainable.counts:
    moved = not np.array_equal(before[path]["kernel"], state.params[path]["kernel"])
    assert moved == (k > 0), path
