"""Layers with no trainable channel leave the differentiated computation entirely.

``freeze_unselected`` zeroes updates with runtime masks, which cannot tell XLA what to skip.
For a layer whose count in the TrainableSet is 0 (static), ``stop_frozen_layers`` puts its
kernel and kernel scale behind ``stop_gradient`` inside the step, so the compiled step has no
weight-gradient op for it. Input gradients still flow through it wherever a param below it
trains (biases and activation-quantizer params always do). The step is retraced only when
the static counts change.
"""

from __future__ import annotations

from typing import Any

import jax
from flax.traverse_util import flatten_dict, unflatten_dict

from efqat_jax.efqat.selection import TrainableSet


def frozen_layers(trainable: TrainableSet) -> frozenset[str]:
  """Paths of the layers with no trainable channel."""
  return frozenset(path for path, k in trainable.counts if k == 0)


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
