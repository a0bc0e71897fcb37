"""Frozen means frozen: zero update, untouched optimizer state, no weight decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efqat_jax import QuantRule, QuantSpec, quantize
from efqat_jax.efqat import freeze_unselected, select, set_trainable, trainable_from_state
from efqat_jax.models import SmallCNN
from efqat_jax.nn import quantized_layers
from tests.built_model import BuiltModel

RULE = QuantRule(".*", weight=QuantSpec.for_weights(4), input=QuantSpec.for_activations(4))
MODEL = quantize(SmallCNN(features=(8, 16)), RULE)
X = jax.random.uniform(jax.random.key(0), (8, 12, 12, 1))
Y = jnp.arange(8) % 10
CNN = BuiltModel(MODEL, X)
OPTIMIZERS = {
  "sgd_momentum": optax.sgd(0.05, momentum=0.9),
  "adam": optax.adam(1e-2),
  "adamw": optax.adamw(1e-2, weight_decay=0.5),
}


def _loss(params):
  logits = MODEL.apply({"params": params}, X)
  return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


def _run(tx, params, opt_state, steps):
  @jax.jit
  def step(params, opt_state):
    updates, opt_state = tx.update(jax.grad(_loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return params, opt_state, step


def _frozen_and_trained(tset, path):
  mask = np.asarray(tset.channel_mask(path))
  return ~mask, mask


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_frozen_channels_do_not_move_and_selected_ones_do(name):
  tx = freeze_unselected(OPTIMIZERS[name])
  tset = select(CNN.params, CNN.layers, "cwpl", 0.25)
  state = set_trainable(tx.init(CNN.params), CNN.params, tset)
  params, _, _ = _run(tx, CNN.params, state, 3)
  for path in ("Conv_0", "Conv_1", "Dense_0"):
    frozen, trained = _frozen_and_trained(tset, path)
    before, after = np.asarray(CNN.params[path]["kernel"]), np.asarray(params[path]["kernel"])
    np.testing.assert_array_equal(after[..., frozen], before[..., frozen])  # exactly, decay too
    assert np.all(
      np.any(after[..., trained] != before[..., trained], axis=tuple(range(before.ndim - 1)))
    )
    scale_before, scale_after = (
      np.asarray(CNN.params[path]["kernel_scale"]),
      np.asarray(params[path]["kernel_scale"]),
    )
    np.testing.assert_array_equal(scale_after[frozen], scale_before[frozen])
    assert not np.array_equal(params[path]["bias"], CNN.params[path]["bias"])  # biases always train


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_channel_frozen_at_reselection_stops_at_once_and_keeps_its_moments(name):
  tx = freeze_unselected(OPTIMIZERS[name])
  everything = select(CNN.params, CNN.layers, "qat")
  params, state, step = _run(
    tx, CNN.params, set_trainable(tx.init(CNN.params), CNN.params, everything), 3
  )
  nothing = select(params, CNN.layers, "ptq")
  state = set_trainable(state, params, nothing)
  params2, state2 = step(params, state)
  for path in ("Conv_0", "Dense_0"):
    np.testing.assert_array_equal(
      params2[path]["kernel"], params[path]["kernel"]
    )  # no momentum carry
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(a, b) if np.ndim(a) > 1 else None,
    state2.inner,
    state.inner,
  )  # kernel moments untouched while frozen
  assert step._cache_size() == 1  # a new selection is data: no retrace


def test_default_trains_everything_like_the_inner_optimizer():
  inner = optax.adam(1e-2)
  a, _, _ = _run(freeze_unselected(inner), CNN.params, freeze_unselected(inner).init(CNN.params), 2)
  b, _, _ = _run(inner, CNN.params, inner.init(CNN.params), 2)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def test_train_frozen_scales_lets_every_kernel_scale_move():
  tx = freeze_unselected(optax.adam(1e-2))
  tset = select(CNN.params, CNN.layers, "ptq", train_frozen_scales=True)
  state = set_trainable(tx.init(CNN.params), CNN.params, tset)
  params, _, _ = _run(tx, CNN.params, state, 2)
  np.testing.assert_array_equal(params["Conv_1"]["kernel"], CNN.params["Conv_1"]["kernel"])
  assert not np.array_equal(params["Conv_1"]["kernel_scale"], CNN.params["Conv_1"]["kernel_scale"])


def test_cheap_params_of_frozen_layers_stay_put_with_selected_layers_and_read_back():
  tx = freeze_unselected(optax.adam(1e-2))
  tset = select(
    CNN.params, CNN.layers, "lwpn", 0.3, cheap_params="selected_layers"
  )  # one layer of 3
  (selected,) = [path for path, k in tset.counts if k]
  state = set_trainable(tx.init(CNN.params), CNN.params, tset)
  params, state, _ = _run(tx, CNN.params, state, 2)
  for path in CNN.layers:
    moved = {
      n for n in CNN.params[path] if not np.array_equal(params[path][n], CNN.params[path][n])
    }
    assert moved >= {"kernel", "bias", "input_scale"} if path == selected else not moved, path
  restored = trainable_from_state(state, params, CNN.layers)
  assert (restored.cheap_params, restored.counts) == ("selected_layers", tset.counts)
  everywhere = select(CNN.params, CNN.layers, "lwpn", 0.3)
  state = set_trainable(tx.init(CNN.params), CNN.params, everywhere)
  assert trainable_from_state(state, CNN.params, CNN.layers).cheap_params == "all_layers"


def test_set_trainable_rejects_a_foreign_state():
  with pytest.raises(ValueError, match="freeze_unselected"):
    set_trainable(
      optax.adam(1e-2).init(CNN.params), CNN.params, select(CNN.params, CNN.layers, "qat")
    )


def test_frozen_state_is_kept_inside_multi_transform_with_decay_before_momentum():
  inner = optax.multi_transform(
    {
      "weights": optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9)),
      "quant": optax.adam(1e-3),
    },
    lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "quant" if "scale" in path[-1].key or "zero" in path[-1].key else "weights",
      params,
    ),
  )
  tx = freeze_unselected(inner)
  tset = select(CNN.params, CNN.layers, "cwpl", 0.25)
  params, state, _ = _run(tx, CNN.params, set_trainable(tx.init(CNN.params), CNN.params, tset), 3)
  momentum = state.inner.inner_states["weights"].inner_state[1][0].trace
  frozen = ~np.asarray(tset.channel_mask("Conv_1"))
  np.testing.assert_array_equal(np.asarray(momentum["Conv_1"]["kernel"])[..., frozen], 0.0)
  np.testing.assert_array_equal(
    np.asarray(params["Conv_1"]["kernel"])[..., frozen],
    np.asarray(CNN.params["Conv_1"]["kernel"])[..., frozen],
  )


def test_selected_state_has_the_shapes_of_a_fresh_state(tmp_path):
  from efqat_jax.train import Checkpointer

  tx = freeze_unselected(optax.adam(1e-2))
  fresh = tx.init(CNN.params)
  selected = set_trainable(
    fresh, CNN.params, select(CNN.params, CNN.layers, "cwpl", 0.25, train_frozen_scales=True)
  )
  assert jax.tree.map(np.shape, selected) == jax.tree.map(np.shape, fresh)
  with Checkpointer(tmp_path / "c") as ckpt:
    ckpt.save(1, selected, wait=True)
    restored = ckpt.restore_latest(fresh)
  jax.tree.map(np.testing.assert_array_equal, restored.masks, selected.masks)


@pytest.mark.parametrize("mode, rho", [("lwpn", 0.3), ("cwpl", 0.25)])
def test_a_per_tensor_weight_scale_trains_only_with_its_whole_layer(mode, rho):
  per_tensor = QuantRule(
    ".*", weight=QuantSpec.for_weights(4, granularity="tensor"), input=QuantSpec.for_activations(4)
  )
  model = quantize(SmallCNN(features=(8, 16)), per_tensor)
  variables = jax.jit(model.init)(jax.random.key(0), X)  # one program, not one per operation
  params, layers = variables["params"], quantized_layers(model, variables, X)
  tx = freeze_unselected(optax.adam(1e-2))
  tset = select(params, layers, mode, rho)  # lwpn: one layer whole; cwpl: part of each
  state = set_trainable(tx.init(params), params, tset)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    model.apply({"params": p}, X), Y
  ).mean()
  updates, _ = jax.jit(tx.update)(jax.jit(jax.grad(loss))(params), state, params)
  after = optax.apply_updates(params, updates)
  for path, k in tset.counts:
    assert np.shape(params[path]["kernel_scale"]) == ()
    kernel_moved = not np.array_equal(after[path]["kernel"], params[path]["kernel"])
    scale_moved = not np.array_equal(after[path]["kernel_scale"], params[path]["kernel_scale"])
    assert kernel_moved == (k > 0), path
    assert scale_moved == (k == tset.size(path)), path  # it also scales frozen channels


def test_a_new_selection_is_placed_like_the_masks_it_replaces():
  """set_trainable on a replicated state keeps the masks replicated, whichever params it reads,
  so a jitted step sees the same input shardings after a re-selection (no retrace)."""
  from efqat_jax.train import make_mesh, replicate

  tx = freeze_unselected(optax.adam(1e-2))
  mesh = make_mesh()
  state = replicate(
    set_trainable(tx.init(CNN.params), CNN.params, select(CNN.params, CNN.layers, "cwpl", 0.5)),
    mesh,
  )
  again = set_trainable(
    state, CNN.params, select(CNN.params, CNN.layers, "cwpl", 0.25)
  )  # unreplicated params
  same = jax.tree.map(lambda a, b: a.sharding == b.sharding, again.masks, state.masks)
  assert all(jax.tree.leaves(same))
