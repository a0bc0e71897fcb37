"""An optax wrapper that freezes what a TrainableSet does not select.

Frozen entries get exactly zero update (so no weight decay either), and their optimizer state
is left as it was: a channel that becomes frozen at re-selection stops at once, and one that
becomes trainable again resumes with the moments it had. What trains besides the selected
kernel channels: every param that is not a quantized kernel (biases, normalisation params,
activation quantizer params) and, unless ``train_frozen_scales``, only the kernel scales of
the selected channels (a frozen channel's scale gradient would need that channel's full weight
gradient).

The masks are data in the optimizer state, so re-selecting never recompiles the step. This
wrapper fixes the semantics; it does not by itself remove the frozen weight-gradient work,
which needs the layouts of ``efqat_jax.nn.partial_grad``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from efqat_jax.efqat.selection import TrainableSet


class FreezeState(NamedTuple):
  """The wrapped optimizer's state and, per param, a mask that broadcasts against it."""

  inner: optax.OptState
  masks: Any


def trainable_masks(params: Any, trainable: TrainableSet, train_frozen_scales: bool = False) -> Any:
  """A params-shaped tree of bool masks (broadcastable to each param; True = trains)."""
  counts = dict(trainable.counts)
  masks = {}
  for path, value in flatten_dict(params).items():
    layer, name = "/".join(path[:-1]), path[-1]
    mask = jnp.ones((), bool)
    if layer in counts and name in ("kernel", "kernel_scale"):
      channel_shape = jnp.shape(params_at(params, layer)["kernel_scale"]) or (value.shape[-1],)
      channels = trainable.channel_mask(layer).reshape(channel_shape)
      if name == "kernel":
        mask = channels.reshape((1,) * (value.ndim - len(channel_shape)) + channel_shape)
      elif not train_frozen_scales:
        mask = channels.reshape(jnp.shape(value)) if jnp.ndim(value) else channels.any()
    masks[path] = mask
  return unflatten_dict(masks)


def params_at(params: Any, layer: str) -> Any:
  node = params
  for name in layer.split("/"):
    node = node[name]
  return node


def freeze_unselected(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Wraps ``inner`` so that entries outside the current TrainableSet stay frozen.

  Everything trains until ``set_trainable`` installs a selection.

  Example:
    >>> tx = freeze_unselected(optax.adamw(1e-3))
    >>> opt_state = set_trainable(tx.init(params), params, select(params, "cwpl", 0.1))
  """

  def init(params):
    return FreezeState(inner.init(params), jax.tree.map(lambda _: jnp.ones((), bool), params))

  def update(updates, state, params=None):
    masked = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, state.masks)
    new_updates, new_inner = inner.update(masked, state.inner, params)
    new_updates = jax.tree.map(
      lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), new_updates, state.masks
    )
    kept = _keep_frozen_state(new_inner, state.inner, state.masks)
    return new_updates, FreezeState(kept, state.masks)

  return optax.GradientTransformation(init, update)


def set_trainable(
  state: FreezeState, params: Any, trainable: TrainableSet, train_frozen_scales: bool = False
) -> FreezeState:
  """The optimizer state of ``freeze_unselected`` with a new selection installed."""
  if not isinstance(state, FreezeState):
    raise ValueError(f"expected the state of freeze_unselected, got {type(state).__name__}")
  return state._replace(masks=trainable_masks(params, trainable, train_frozen_scales))


def _keep_frozen_state(new: Any, old: Any, masks: Any) -> Any:
  """In every params-shaped part of an optimizer state, frozen entries keep their old value."""
  mask_def = jax.tree.structure(masks)
  if jax.tree.structure(new) == mask_def:
    return jax.tree.map(lambda n, o, m: jnp.where(m, n, o), new, old, masks)
  if isinstance(new, tuple) and hasattr(new, "_fields"):  # NamedTuple states (Adam, trace...)
    return type(new)(*(_keep_frozen_state(n, o, masks) for n, o in zip(new, old, strict=True)))
  if isinstance(new, tuple | list):
    return type(new)(_keep_frozen_state(n, o, masks) for n, o in zip(new, old, strict=True))
  return new
