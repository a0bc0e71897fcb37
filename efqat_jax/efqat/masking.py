"""An optax wrapper that freezes what a TrainableSet does not select.

Frozen entries get exactly zero update (so no weight decay either), and their optimizer state
is left as it was: a channel that becomes frozen at re-selection stops at once, and one that
becomes trainable again resumes with the moments it had (research/methods.md 2.7, reading 4).
The state therefore keeps its full size; what the frozen entries cost is its memory, not
optimizer arithmetic that changes anything.

What trains besides the selected kernel channels: every param that is not a quantized kernel
(biases, normalisation params, activation quantizer params) and, unless the TrainableSet says
``train_frozen_scales``, only the kernel scales of the selected channels (a frozen channel's
scale gradient would need that channel's full weight gradient).

The masks are data in the optimizer state, so re-selecting never recompiles the step. This
wrapper fixes the semantics; the train step removes the frozen weight-gradient work
(``efqat_jax.efqat.restrict_backward``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from efqat_jax.efqat.importance import output_axes, quantized_kernels
from efqat_jax.efqat.selection import TrainableSet, select
from efqat_jax.nn.export import params_at


class FreezeState(NamedTuple):
  """The wrapped optimizer's state and, per param, a mask that broadcasts against it."""

  inner: optax.OptState
  masks: Any


def trainable_masks(params: Any, trainable: TrainableSet) -> Any:
  """A params-shaped tree of bool masks (broadcastable to each param; True = trains)."""
  counts = dict(trainable.counts)
  masks = {}
  for path, value in flatten_dict(params).items():
    layer, name = "/".join(path[:-1]), path[-1]
    mask = jnp.ones((), bool)
    if layer in counts and name in ("kernel", "kernel_scale"):
      kernel = params_at(params, layer)["kernel"]
      channel_shape = kernel.shape[kernel.ndim - output_axes(params, layer) :]
      channels = trainable.channel_mask(layer).reshape(channel_shape)
      if name == "kernel":
        mask = channels.reshape((1,) * (value.ndim - len(channel_shape)) + channel_shape)
      elif trainable.train_frozen_scales:
        mask = jnp.ones(jnp.shape(value), bool)
      else:
        mask = channels.reshape(jnp.shape(value)) if jnp.ndim(value) else channels.any()
    masks[path] = mask
  return unflatten_dict(masks)


def freeze_unselected(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Wraps ``inner`` so that entries outside the current TrainableSet stay frozen.

  Everything trains until ``set_trainable`` installs a selection.

  Example:
    >>> tx = freeze_unselected(optax.adamw(1e-3))
    >>> opt_state = set_trainable(tx.init(params), params, select(params, "cwpl", 0.1))
  """

  def init(params):
    return FreezeState(inner.init(params), _everything_trains(params))

  def update(updates, state, params=None):
    masked = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, state.masks)
    new_updates, new_inner = inner.update(masked, state.inner, params)
    new_updates = jax.tree.map(
      lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), new_updates, state.masks
    )
    kept = _keep_frozen_state(new_inner, state.inner, state.masks)
    return new_updates, FreezeState(kept, state.masks)

  return optax.GradientTransformation(init, update)


def set_trainable(state: FreezeState, params: Any, trainable: TrainableSet) -> FreezeState:
  """The optimizer state of ``freeze_unselected`` with a new selection installed."""
  if not isinstance(state, FreezeState):
    raise ValueError(f"expected the state of freeze_unselected, got {type(state).__name__}")
  return state._replace(masks=trainable_masks(params, trainable))


def trainable_from_state(state: FreezeState, params: Any) -> TrainableSet:
  """The selection installed in ``state`` (e.g. restored from a checkpoint).

  Its channels come in ascending order rather than by importance, which changes nothing that
  trains; ``train_frozen_scales`` is read off the kernel-scale masks.
  """
  counts, sizes, channels, scales_differ = {}, {}, {}, False
  for path in quantized_kernels(params):
    masks = params_at(state.masks, path)
    kernel = np.asarray(masks["kernel"]).reshape(-1)
    scale = np.asarray(masks["kernel_scale"]).reshape(-1)
    scales_differ |= scale.size == kernel.size and bool(np.any(scale != kernel))
    channels[path] = jnp.asarray(np.flatnonzero(kernel), jnp.int32)
    counts[path], sizes[path] = int(kernel.sum()), kernel.size
  return TrainableSet(
    tuple(sorted(counts.items())), tuple(sorted(sizes.items())), channels, scales_differ
  )


def _everything_trains(params: Any) -> Any:
  """All-True masks with the shapes ``set_trainable`` installs (so a checkpointed state
  restores into ``init``'s structure and re-selecting never changes shapes)."""
  try:
    return trainable_masks(params, select(params, "qat"))
  except ValueError:  # no quantized layer: nothing is ever selected
    return jax.tree.map(lambda _: jnp.ones((), bool), params)


def _is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _keep_frozen_state(new: Any, old: Any, masks: Any) -> Any:
  """In every params-shaped part of an optimizer state, frozen entries keep their old value.

  Params-shaped parts are found in NamedTuple, tuple, list and dict states (``chain``,
  ``multi_transform``); entries another transformation owns (``optax.MaskedNode``) are left.
  """
  if jax.tree.structure(new, is_leaf=_is_masked_node) == jax.tree.structure(masks):
    keep = lambda n, o, m: n if _is_masked_node(n) else jnp.where(m, n, o)
    return jax.tree.map(keep, new, old, masks, is_leaf=_is_masked_node)
  if isinstance(new, tuple) and hasattr(new, "_fields"):  # NamedTuple states (Adam, trace...)
    return type(new)(*(_keep_frozen_state(n, o, masks) for n, o in zip(new, old, strict=True)))
  if isinstance(new, tuple | list):
    return type(new)(_keep_frozen_state(n, o, masks) for n, o in zip(new, old, strict=True))
  if isinstance(new, dict):
    return {k: _keep_frozen_state(v, old[k], masks) for k, v in new.items()}
  return new
