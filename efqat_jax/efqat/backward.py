"""A backward pass whose cost follows what trains.

``freeze_unselected`` zeroes updates with runtime masks, which cannot tell XLA what to skip.
Inside the step, ``restrict_backward`` turns the static counts of a TrainableSet into less work:
  - a layer none of whose units trains a channel has its weight (and, unless
    ``train_frozen_scales``, its weight scale) behind ``stop_gradient``: the compiled step has no
    weight-gradient op for it;
  - a layer that trains some but not all of its channels computes its weight gradient for
    those only: its trainable channels ride next to its weight as an int32 leaf
    (``efqat_jax.nn.GRAD_CHANNELS``), which ``nn.scan`` / ``nn.vmap`` slice per layer like any
    param. The layers of a stack run one program, so they share the largest count of the
    stack; units with fewer pad with an index past the last channel (no gradient);
  - a fully trainable layer is left alone;
  - with ``cheap_params="selected_layers"``, a frozen layer's other params (bias, activation
    quantizer) and those of its attached modules (its norm) are constant too.
Input gradients flow through every layer wherever a param below it trains: with
``cheap_params="all_layers"`` (biases, norms and activation-quantizer params train everywhere),
down to the first layer; with ``"selected_layers"``, down to the lowest layer with selected
weights. The step is retraced only when the counts change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from efqat_jax.efqat.selection import TrainableSet
from efqat_jax.nn.layer_table import GRAD_CHANNELS


def _max_counts(trainable: TrainableSet) -> dict[str, int]:
  """Per layer path, the largest count of its units."""
  return {
    layer.path: max(trainable.count(unit) for unit in layer.units()) for layer in trainable.layers
  }


def partial_layers(trainable: TrainableSet) -> dict[str, jax.Array]:
  """The trainable channels of the layers that train some but not all of their channels:
  int32 ``[*stack_shape, k]``, padded with C (no channel) where a unit trains fewer than k.

  Empty with ``train_frozen_scales``: the frozen channels' scale gradients need the full
  weight gradient.
  """
  if trainable.train_frozen_scales:
    return {}
  out, counts = {}, _max_counts(trainable)
  for layer in trainable.layers:
    k, size = counts[layer.path], layer.num_channels
    if not 0 < k < size:
      continue
    padded = [
      jnp.concatenate([trainable.channels[u], jnp.full(k - trainable.count(u), size, jnp.int32)])
      for u in layer.units()
    ]
    out[layer.path] = jnp.stack(padded).reshape(*layer.stack_shape, k)
  return out


def stop_frozen_layers(params: Any, trainable: TrainableSet) -> Any:
  """``params`` with the weights (and, unless ``trainable.train_frozen_scales``, the weight
  scales) of fully frozen layers made constant, and the cheap params that stay frozen."""
  flat = flatten_dict(params)
  keys = list(trainable.frozen_cheap_params(params))
  for layer in trainable.frozen_layers():
    names = (layer.weight_name,) if trainable.train_frozen_scales else (
      layer.weight_name, layer.scale_name,
    )  # fmt: skip
    keys += [(*layer.path.split("/"), name) for name in names]
  for key in keys:
    flat[key] = jax.lax.stop_gradient(flat[key])
  return unflatten_dict(flat)


@contextlib.contextmanager
def restrict_backward(params: Any, trainable: TrainableSet | None) -> Iterator[Any]:
  """Yields the params to run the differentiated forward pass with: fully frozen layers'
  weights made constant, and partly trained layers carrying their trainable channels.

  A ``param_context`` for ``efqat_jax.train.make_train_step``. With ``trainable=None`` (plain
  QAT) it yields ``params`` unchanged.
  """
  if trainable is None:
    yield params
    return
  flat = flatten_dict(stop_frozen_layers(params, trainable))
  for path, channels in partial_layers(trainable).items():
    flat[(*path.split("/"), GRAD_CHANNELS)] = channels
  yield unflatten_dict(flat)
