"""Layers without a trainable channel have no weight-gradient op in the compiled step."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efqat_jax import QuantRule, QuantSpec, quantize
from efqat_jax.efqat import freeze_unselected, restrict_backward, select, set_trainable
from efqat_jax.models import SmallCNN
from efqat_jax.nn import quantized_layers
from efqat_jax.train import create_train_state, make_mesh, make_train_step, replicate, shard_batch
from tests.built_model import BuiltModel

RULE = QuantRule(".*", weight=QuantSpec.for_weights(4), input=QuantSpec.for_activations(4))
MODEL = quantize(SmallCNN(features=(8, 16, 16)), RULE)  # Conv_0..2, Dense_0
X = jax.random.uniform(jax.random.key(0), (8, 12, 12, 1))
Y = jnp.arange(8) % 10
CNN = BuiltModel(MODEL, X)
# One compiled init per model (eager init compiles each of its operations on its own).


def _step(model, tx, mesh):
  return make_train_step(model, tx, mesh, param_context=restrict_backward)


@pytest.fixture(scope="module")
def setup():
  mesh, tx = make_mesh(), freeze_unselected(optax.adam(1e-2))
  state = replicate(create_train_state(CNN.variables, tx), mesh)
  return state, _step(MODEL, tx, mesh), shard_batch({"inputs": X, "labels": Y}, mesh)


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
  assert _op_counts(step, state, batch, select(state.params, CNN.layers, mode, rho)) == (
    convolutions,
    dots,
  )


@pytest.mark.parametrize("mode, rho", [("ptq", 0.0), ("lwpn", 0.25), ("lwpn", 0.5)])
def test_with_cheap_params_in_selected_layers_only_the_backward_stops_at_the_lowest_one(
  setup, mode, rho
):
  """Layers in call order Conv_0..2, Dense_0: an input gradient for the lowest selected layer
  (its input quantizer's scale trains) and every layer above it, a weight gradient for every
  selected one, nothing below."""
  state, step, batch = setup
  trainable = select(state.params, CNN.layers, mode, rho, cheap_params="selected_layers")
  order = list(CNN.layers)
  selected = [i for i, path in enumerate(order) if trainable.count(path)]
  lowest = min(selected, default=len(order))
  is_conv = [path.startswith("Conv") for path in order]
  above = [i for i in range(len(order)) if i >= lowest]
  convolutions = 3 + sum(is_conv[i] for i in above) + sum(is_conv[i] for i in selected)
  dots = 1 + sum(not is_conv[i] for i in above) + sum(not is_conv[i] for i in selected)
  assert _op_counts(step, state, batch, trainable) == (convolutions, dots)


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
  trainable = select(state.params, CNN.layers, "cwpl", 0.25)  # 8, 16, 16, 10 channels -> 2, 4, 4, 3
  shapes = _backward_output_shapes(step, state, batch, trainable)
  for path, k in trainable.counts:
    kernel = state.params[path]["kernel"].shape
    assert (k, kernel[-1]) in [(2, 8), (4, 16), (3, 10)], path
    assert _weight_gradient(kernel, k) in shapes, path
    assert _weight_gradient(kernel, kernel[-1]) not in shapes, path
  full = _backward_output_shapes(step, state, batch, select(state.params, CNN.layers, "qat"))
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


class Tied(nn.Module):
  """Embedding lookup, a multi-axis DenseGeneral, an Einsum and a tied output projection."""

  @nn.compact
  def __call__(self, x, train=False):
    embed = nn.Embed(10, 12)
    h = embed(jnp.argmax(x.reshape(x.shape[0], -1, 12), axis=-1) % 10)  # [batch, 12, 12]
    h = nn.DenseGeneral((2, 6))(h).reshape(*h.shape[:-1], 12)
    h = nn.relu(nn.Einsum((12, 3, 4), "btd,dhk->bthk")(h)).reshape(*h.shape[:-1], 12)
    return embed.attend(h.mean(axis=1))


class Scanned(nn.Module):
  """Three residual Dense blocks stacked by nn.scan over nn.remat (one params tree per axis)."""

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Dense(16)(x.reshape(x.shape[0], -1))

    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return h + nn.Dense(16)(nn.relu(nn.Dense(24)(h))), None

    stack = nn.scan(
      nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
    )
    h, _ = stack(name="blocks")(h, None)
    return nn.Dense(10)(h)


def _rule(granularity):
  weights = {
    "channel": QuantSpec.for_weights(4),
    "tensor": QuantSpec.for_weights(4, granularity="tensor"),
    "group": QuantSpec.for_weights(4, granularity="group", axis=-1, group_size=2),
  }[granularity]
  return QuantRule(".*", weight=weights, input=QuantSpec.for_activations(4))


EQUALITY_CASES = {
  "cnn-channel-cwpl": (SmallCNN(features=(8, 16, 16)), "channel", "cwpl", 0.25),
  "cnn-tensor-cwpl": (SmallCNN(features=(8, 16, 16)), "tensor", "cwpl", 0.25),
  "cnn-group-cwpl": (SmallCNN(features=(8, 16, 16)), "group", "cwpl", 0.3),
  "grouped-convs-cwpl": (GroupedConvs(), "channel", "cwpl", 0.3),
  "tied-einsum-cwpl": (Tied(), "channel", "cwpl", 0.3),
  "tied-einsum-tensor-cwpn": (Tied(), "tensor", "cwpn", 0.3),
  "scan-remat-cwpl": (Scanned(), "channel", "cwpl", 0.25),
  "scan-remat-cwpn": (Scanned(), "channel", "cwpn", 0.2),
  "scan-remat-group-lwpn": (Scanned(), "group", "lwpn", 0.4),
}


ADAM_CASES = ("scan-remat-cwpn",)  # SGD: every case


@pytest.mark.parametrize(
  "case, optimizer",
  [(c, "sgd") for c in EQUALITY_CASES] + [(c, "adam") for c in ADAM_CASES],
)
def test_restricted_backward_updates_params_like_the_full_backward_with_masks(case, optimizer):
  """The cheaper backward changes nothing but the work: SGD (whose update is the gradient
  itself) and several Adam steps with it equal those with the full weight gradients and the
  same freezing masks, for every weight granularity and layer kind."""
  model, granularity, mode, rho = EQUALITY_CASES[case]
  model = quantize(model, _rule(granularity))
  mesh = make_mesh()
  inner = optax.sgd(0.5) if optimizer == "sgd" else optax.adam(1e-2)
  tx = freeze_unselected(inner)
  variables = jax.jit(model.init)(jax.random.key(0), X)
  state = replicate(create_train_state(variables, tx), mesh)
  trainable = select(state.params, quantized_layers(model, variables, X), mode, rho)
  assert (
    0 < sum(k for _, k in trainable.counts) < sum(trainable.size(u) for u, _ in trainable.counts)
  )
  state = state.replace(opt_state=set_trainable(state.opt_state, state.params, trainable))
  batch = shard_batch({"inputs": X, "labels": Y}, mesh)
  step = _step(model, tx, mesh)
  restricted, full = state, jax.tree.map(jnp.copy, state)
  for i in range(1 if optimizer == "sgd" else 3):
    restricted, _ = step(restricted, batch, jax.random.key(i), trainable)
    full, _ = step(full, batch, jax.random.key(i), None)
  moved = jax.tree.map(
    lambda a, b: bool(np.any(a != b)), jax.device_get(full.params), variables["params"]
  )
  assert sum(jax.tree.leaves(moved)) > 1
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
    restricted.params,
    full.params,
  )


def test_lwpn_drops_the_weight_gradients_of_the_frozen_layers(setup):
  state, step, batch = setup
  trainable = select(state.params, CNN.layers, "lwpn", 0.5)
  trained = {p for p, k in trainable.counts if k}
  conv_dw = sum(p.startswith("Conv") for p in trained)
  dense_dw = int("Dense_0" in trained)
  assert _op_counts(step, state, batch, trainable) == (6 + conv_dw, 2 + dense_dw)


def test_reselection_retraces_only_when_counts_change(setup):
  state, step, batch = setup
  tx = freeze_unselected(optax.adam(1e-2))
  mesh = make_mesh()
  state = replicate(create_train_state(CNN.variables, tx), mesh)
  fresh = _step(MODEL, tx, mesh)
  for i in range(3):
    trainable = select(state.params, CNN.layers, "cwpl", 0.25)
    state = state.replace(opt_state=set_trainable(state.opt_state, state.params, trainable))
    state, _ = fresh(state, batch, jax.random.key(i), trainable)
  assert fresh.jitted._cache_size() == 1
  state, _ = fresh(state, batch, jax.random.key(9), select(state.params, CNN.layers, "lwpn", 0.5))
  assert fresh.jitted._cache_size() == 2


def test_frozen_layer_params_do_not_move_through_the_full_step(setup):
  state, step, batch = setup
  tx = freeze_unselected(optax.adam(1e-2))
  mesh = make_mesh()
  state = replicate(create_train_state(CNN.variables, tx), mesh)
  trainable = select(state.params, CNN.layers, "lwpn", 0.5)
  state = state.replace(opt_state=set_trainable(state.opt_state, state.params, trainable))
  before = jax.device_get(state.params)
  state, _ = _step(MODEL, tx, mesh)(state, batch, jax.random.key(0), trainable)
  for path, k in trainable.counts:
    moved = not np.array_equal(before[path]["kernel"], state.params[path]["kernel"])
    assert moved == (k > 0), path
