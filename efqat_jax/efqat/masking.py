"""An optax wrapper that freezes what a TrainableSet does not select.

Frozen entries get exactly zero update (so no weight decay either), and their optimizer state
is left as it was: a channel that becomes frozen at re-selection stops at once, and one that
becomes trainable again resumes with the moments it had (EfQAT, arXiv 2411.11038, leaves this open; this is our reading).
The state therefore keeps its full size; what the frozen entries cost is its memory, not
optimizer arithmetic that changes anything.

What trains besides the selected weight channels: the params that are not quantized weights
(biases, normalisation params, activation quantizer params) in every layer, or with
``cheap_params="selected_layers"`` only in the layers with selected weights (see
``efqat_jax.efqat.select``), and, unless the TrainableSet says ``train_frozen_scales``, the
weight scales all of whose entries lie in selected channels (a scale that covers a frozen
channel, e.g. a per-tensor scale of a partly trained layer, would need that channel's full
weight gradient).

The masks are data in the optimizer state, so re-selecting never recompiles the step. This
wrapper fixes the semantics; the train step removes the frozen weight-gradient work
(``efqat_jax.efqat.restrict_backward``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from efqat_jax.efqat.selection import TrainableSet
from efqat_jax.nn.layer_table import QuantizedLayer, params_at
from efqat_jax.quant import granularity


class FreezeState(NamedTuple):
  """The wrapped optimizer's state and, per param, a bool mask of its shape (True = trains)."""

  inner: optax.OptState
  masks: Any


def _weight_mask(layer: QuantizedLayer, channel_mask: np.ndarray) -> np.ndarray:
  """One layer's bool weight mask from its channel mask ``[C]``."""
  out_shape = [layer.weight_shape[a] for a in layer.out_axes]
  shape = [n if a in layer.out_axes else 1 for a, n in enumerate(layer.weight_shape)]
  mask = channel_mask.reshape(out_shape).reshape(shape)
  return np.broadcast_to(mask, layer.weight_shape)


def _scale_mask(layer: QuantizedLayer, weight_mask: np.ndarray) -> np.ndarray:
  """True for each weight scale all of whose entries train (a scale that covers a frozen
  channel would need that channel's weight gradient)."""
  spec, shape = layer.weight_spec, layer.weight_shape
  covered = granularity.reduce_blocks(np.all, granularity.to_blocks(weight_mask, spec), spec, shape)
  return covered.reshape(granularity.param_shape(spec, shape))


def _channel_mask(trainable: TrainableSet, unit: str) -> np.ndarray:
  mask = np.zeros(trainable.size(unit), bool)
  mask[np.asarray(trainable.channels[unit])] = True
  return mask


def trainable_masks(params: Any, trainable: TrainableSet) -> Any:
  """A params-shaped tree of bool masks (True = trains), as numpy arrays.

  Computed on the host: a selection costs no compilation (the masks are small next to the
  params, and ``set_trainable`` places them where the old ones were)."""
  flat = {path: np.ones(np.shape(v), bool) for path, v in flatten_dict(params).items()}
  for layer in trainable.layers:
    node = tuple(layer.path.split("/"))
    weight_masks, scale_masks = [], []
    for unit in layer.units():
      weight_mask = _weight_mask(layer, _channel_mask(trainable, unit))
      weight_masks.append(weight_mask)
      scale_masks.append(_scale_mask(layer, weight_mask))
    stack = lambda masks, like: np.stack(masks).reshape(np.shape(like))
    weight, scale = node + (layer.weight_name,), node + (layer.scale_name,)
    flat[weight] = stack(weight_masks, flat[weight])
    if not trainable.train_frozen_scales:
      flat[scale] = stack(scale_masks, flat[scale])
  for key in trainable.frozen_cheap_params(params):
    flat[key] = np.zeros_like(flat[key])
  return unflatten_dict(flat)


def freeze_unselected(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Wraps ``inner`` so that entries outside the current TrainableSet stay frozen.

  Everything trains until ``set_trainable`` installs a selection.

  Example:
    >>> tx = freeze_unselected(optax.adamw(1e-3))
    >>> layers = efqat_jax.nn.quantized_layers(qmodel, variables, inputs)
    >>> opt_state = set_trainable(tx.init(params), params, select(params, layers, "cwpl", 0.1))
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
  """The optimizer state of ``freeze_unselected`` with a new selection installed, its masks
  placed as the ones they replace (so a step taking the state sees the same input shardings,
  and a re-selection never retraces it). The masks are built on the host, like the selection:
  call it outside ``jit``."""
  if not isinstance(state, FreezeState):
    raise ValueError(f"expected the state of freeze_unselected, got {type(state).__name__}")
  masks = jax.tree.map(_placed_like, trainable_masks(params, trainable), state.masks)
  return state._replace(masks=masks)


def _placed_like(new: np.ndarray, old: Any) -> jax.Array:
  """``new`` on ``old``'s devices and sharding where ``old`` was placed there (committed), else
  on the default device."""
  if isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer) and old.committed:
    return jax.device_put(new, old.sharding)
  return jnp.asarray(new)


def trainable_from_state(
  state: FreezeState, params: Any, layers: Mapping[str, QuantizedLayer]
) -> TrainableSet:
  """The selection installed in ``state`` (e.g. restored from a checkpoint).

  Its channels come in ascending order rather than by importance, which changes nothing that
  trains; ``train_frozen_scales`` is read off the weight-scale masks, and ``cheap_params`` off
  the masks of the frozen layers' other params.
  """
  layers = dict(sorted(layers.items()))
  counts, channels = {}, {}
  for layer in layers.values():
    masks = np.asarray(params_at(state.masks, layer.path)[layer.weight_name])
    for index in layer.indices():
      per_channel = np.moveaxis(masks[index], layer.out_axes, range(-len(layer.out_axes), 0))
      trains = per_channel.reshape(-1, layer.num_channels).any(axis=0)
      channels[layer.unit(index)] = jnp.asarray(np.flatnonzero(trains), jnp.int32)
      counts[layer.unit(index)] = int(trains.sum())
  selection = TrainableSet(tuple(sorted(counts.items())), tuple(layers.values()), channels)
  frozen_scales_train = any(
    bool(np.any(np.asarray(params_at(state.masks, layer.path)[layer.scale_name]) != expected))
    for layer, expected in _scale_masks(params, selection)
  )
  frozen_cheap = dataclasses.replace(selection, cheap_params="selected_layers")
  flat_masks = flatten_dict(state.masks)
  cheap = frozen_cheap.frozen_cheap_params(params)
  cheap_params = (
    "selected_layers" if any(not np.any(flat_masks[k]) for k in cheap) else "all_layers"
  )
  return TrainableSet(
    selection.counts, selection.layers, channels, frozen_scales_train, cheap_params
  )


def _scale_masks(params: Any, trainable: TrainableSet):
  """``(layer, its weight-scale mask)`` for every layer, scales of frozen channels frozen."""
  masks = trainable_masks(params, trainable)
  for layer in trainable.layers:
    yield layer, params_at(masks, layer.path)[layer.scale_name]


def _everything_trains(params: Any) -> Any:
  """All-True masks of the params' shapes (what ``set_trainable`` installs has these shapes,
  so a checkpointed state restores into ``init``'s structure and re-selecting never changes
  shapes)."""
  return jax.device_put(jax.tree.map(lambda p: np.ones(np.shape(p), bool), params))


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
