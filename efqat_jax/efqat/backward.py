"""A backward pass whose cost follows what trains.

``freeze_unselected`` zeroes updates with runtime masks, which cannot tell XLA what to skip.
Inside the step, ``restrict_backward`` turns the static counts of a TrainableSet into less work:
  - a layer with no trainable channel has its kernel (and, unless ``train_frozen_scales``, its
    kernel scale) behind ``stop_gradient``: the compiled step has no weight-gradient op for it;
  - a layer with k of C channels trainable computes its weight gradient for those k only
    (``efqat_jax.nn.weight_grad_channels``);
  - a fully trainable layer is left alone.
Input gradients still flow through every layer wherever a param below it trains (biases and
activation-quantizer params always do). The step is retraced only when the counts change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
from flax.traverse_util import flatten_dict, unflatten_dict

from efqat_jax.efqat.selection import TrainableSet
from efqat_jax.nn.ops import weight_grad_channels


def frozen_layers(trainable: TrainableSet) -> frozenset[str]:
  """Paths of the layers with no trainable channel."""
  return frozenset(path for path, k in trainable.counts if k == 0)


def partial_layers(trainable: TrainableSet) -> dict[str, jax.Array]:
  """The trainable channels of the layers that train some but not all of their channels.

  Empty with ``train_frozen_scales``: the frozen channels' scale gradients need the full
  weight gradient.
  """
  if trainable.train_frozen_scales:
    return {}
  return {
    path: trainable.channels[path] for path, k in trainable.counts if 0 < k < trainable.size(path)
  }


def stop_frozen_layers(params: Any, trainable: TrainableSet) -> Any:
  """``params`` with the kernels (and, unless ``trainable.train_frozen_scales``, the kernel
  scales) of fully frozen layers made constant."""
  frozen = frozen_layers(trainable)
  names = ("kernel",) if trainable.train_frozen_scales else ("kernel", "kernel_scale")
  flat = flatten_dict(params)
  for path, value in flat.items():
    if path[-1] in names and "/".join(path[:-1]) in frozen:
      flat[path] = jax.lax.stop_gradient(value)
  return unflatten_dict(flat)


@contextlib.contextmanager
def restrict_backward(params: Any, trainable: TrainableSet | None) -> Iterator[Any]:
  """Yields ``params`` to run the differentiated forward pass with, inside a context where the
  partially trained layers compute their weight gradient for their trainable channels only.

  With ``trainable=None`` (plain QAT) it yields ``params`` unchanged.
  """
  if trainable is None:
    yield params
    return
  with weight_grad_channels(partial_layers(trainable)):
    yield stop_frozen_layers(params, trainable)
