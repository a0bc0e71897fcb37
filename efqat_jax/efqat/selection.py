"""Which weights train: a TrainableSet chosen by importance (CWPL, CWPN, LWPN, or the ends).

Modes (``rho`` is the unfrozen fraction):
  cwpl  in every quantized layer, the ceil(rho * C) most important output channels;
  cwpn  the ceil(rho * N) most important of all N output channels of the network, ranked
        together by raw mean |w|, so layers get different counts;
  lwpn  the ceil(rho * L) most important of the L layers, each trained whole;
  qat   everything (rho is ignored);  ptq  nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efqat_jax.efqat.importance import (
  channel_importance,
  layer_importance,
  output_axes,
  quantized_kernels,
)

MODES = ("cwpl", "cwpn", "lwpn", "qat", "ptq")


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["channels"],
  meta_fields=["counts", "sizes", "train_frozen_scales"],
)
@dataclasses.dataclass(frozen=True)
class TrainableSet:
  """Per quantized layer: how many output channels train (static) and which (data).

  Attributes:
    counts: ``{path: k}``, the number of trainable output channels; static under jit, so a new
      selection with the same counts reuses the compiled step.
    sizes: ``{path: C}``, the layer's number of output channels.
    channels: ``{path: int32[k]}``, the trainable channels, most important first.
    train_frozen_scales: whether the kernel scales of frozen channels train anyway (their
      gradient then needs the layer's full weight gradient).
  """

  counts: tuple[tuple[str, int], ...]
  sizes: tuple[tuple[str, int], ...]
  channels: dict[str, jax.Array]
  train_frozen_scales: bool = False

  def count(self, path: str) -> int:
    return dict(self.counts)[path]

  def size(self, path: str) -> int:
    return dict(self.sizes)[path]

  def channel_mask(self, path: str) -> jax.Array:
    """Bool ``[C]``: True for the trainable channels of ``path``."""
    return jnp.zeros(self.size(path), bool).at[self.channels[path]].set(True)

  def fractions(self) -> dict[str, float]:
    """Trainable share of output channels per layer (equal to the share of kernel params)."""
    return {path: k / dict(self.sizes)[path] for path, k in self.counts}

  def summary(self, params: Any) -> dict[str, float]:
    """What trains, for logging: per layer the share of channels and of kernel params (equal
    within a layer), and over the network the share of channels and of kernel params."""
    kernel_sizes = {path: np.size(w) for path, w in quantized_kernels(params).items()}
    sizes = dict(self.sizes)
    trained = sum(k / sizes[p] * kernel_sizes[p] for p, k in self.counts)
    out = {
      "channel_fraction": sum(k for _, k in self.counts) / sum(sizes.values()),
      "param_fraction": trained / sum(kernel_sizes.values()),
    }
    for path, share in self.fractions().items():
      out[f"{path}/channel_fraction"] = out[f"{path}/param_fraction"] = share
    return out


def _validate(mode: str, rho: float, bucket: int) -> None:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if not 0.0 <= rho <= 1.0:
    raise ValueError(f"rho must be in [0, 1], got {rho!r}")
  if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
    raise ValueError(f"bucket must be a positive int, got {bucket!r}")


def _bucketed(k: int, size: int, bucket: int) -> int:
  return min(size, -(-k // bucket) * bucket) if k else 0


def select(
  params: Any, mode: str, rho: float = 0.1, bucket: int = 1, train_frozen_scales: bool = False
) -> TrainableSet:
  """Chooses the trainable output channels of every quantized layer.

  Args:
    params: the model's params (quantized layers have a ``kernel_scale``).
    mode: one of ``MODES``.
    rho: fraction of channels (cwpl, cwpn) or layers (lwpn) that train.
    bucket: for cwpn, per-layer counts are rounded up to a multiple of ``bucket`` (capped at
      C), so that re-selections change the static counts, and recompile the step, less often.
    train_frozen_scales: let the kernel scales of frozen channels train.

  Returns:
    The TrainableSet.
  """
  _validate(mode, rho, bucket)
  kernels = quantized_kernels(params)
  if not kernels:
    raise ValueError("params have no quantized layer (no 'kernel_scale'): nothing to select")
  scores = {
    path: np.asarray(channel_importance(w, output_axes(params, path)))
    for path, w in kernels.items()
  }
  sizes = {path: s.size for path, s in scores.items()}
  if mode == "qat":
    counts = dict(sizes)
  elif mode == "ptq":
    counts = dict.fromkeys(sizes, 0)
  elif mode == "cwpl":
    counts = {path: math.ceil(rho * c) for path, c in sizes.items()}
  elif mode == "lwpn":
    ranked = sorted(kernels, key=lambda p: -float(layer_importance(kernels[p])))
    chosen = set(ranked[: math.ceil(rho * len(ranked))])
    counts = {path: sizes[path] if path in chosen else 0 for path in sizes}
  else:  # cwpn
    pooled = np.concatenate(list(scores.values()))
    k = math.ceil(rho * pooled.size)
    threshold = np.sort(pooled)[::-1][k - 1] if k else np.inf
    counts = {path: int(np.sum(s >= threshold)) for path, s in scores.items()}
    counts = {path: _bucketed(k, sizes[path], bucket) for path, k in counts.items()}
  channels = {
    path: jnp.asarray(np.argsort(-scores[path], kind="stable")[: counts[path]], jnp.int32)
    for path in sizes
  }
  return TrainableSet(
    tuple(sorted(counts.items())), tuple(sorted(sizes.items())), channels, train_frozen_scales
  )
