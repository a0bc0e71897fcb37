"""A kernel as a matrix of rows: one row per output channel, one column per input it multiplies.

Layer-wise PTQ (OPTQ, GPFQ, AXE) and the accumulator checks work on this view. Row ``o`` holds
the weights output channel ``o`` sums over. ``kernel_axes`` orders them as the op contracts them:
a convolution's input feature first, then its window, matching
``lax.conv_general_dilated_patches`` (the order calibration statistics are captured in).
``summation_axes`` orders them as an accumulator adds them up, in one of the
``ACCUMULATION_ORDERS`` (e.g. ``"hwc"``: window first, input feature fastest); with tiles
(multi-stage accumulation) that order decides which inputs share an accumulator.
Output channels are flattened in C order over the kernel's output axes, as everywhere else in the
library.

Example:
  >>> out_axes, in_axes = kernel_axes("conv", dn, kernel.ndim)  # HWIO: (3,), (2, 0, 1)
  >>> rows = to_rows(kernel, out_axes, in_axes)                 # [O, I * H * W]
  >>> same = from_rows(rows, kernel.shape, out_axes, in_axes)
  >>> summation_axes("conv", dn, kernel.ndim, "hwc")             # (3,), (0, 1, 2)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efqat_jax.quant import granularity
from efqat_jax.quant.accumulator import ACCUMULATION_ORDERS
from efqat_jax.quant.spec import QuantSpec


def kernel_axes(op: str, dimension_numbers: Any, ndim: int) -> tuple[tuple[int, ...], ...]:
  """``(output axes, input axes)`` of a kernel: what the op keeps and what it sums over.

  Args:
    op: ``"dot_general"``, ``"conv"`` or ``"take"`` (an embedding table: one row per entry).
    dimension_numbers: the op's (``lax.ConvDimensionNumbers`` for a convolution).
    ndim: the kernel's rank.

  Raises:
    ValueError: for a dot_general whose kernel has batch axes (one matrix per batch entry).
  """
  if op == "conv":
    rhs_spec = dimension_numbers.rhs_spec
    return (rhs_spec[0],), tuple(rhs_spec[1:])
  if op == "take":
    return (0,), tuple(range(1, ndim))
  (_, rc), (_, rb) = dimension_numbers
  if rb:
    raise ValueError(
      f"a dot_general with kernel batch axes {tuple(rb)} is one matrix per batch entry;"
      " layer-wise quantization and accumulator checks need a single matrix"
    )
  return tuple(d for d in range(ndim) if d not in rc), tuple(rc)


def summation_axes(
  op: str, dimension_numbers: Any, ndim: int, order: str
) -> tuple[tuple[int, ...], ...]:
  """``(output axes, input axes)`` of a kernel, the input axes in the order an accumulator sums
  them: for a convolution, ``"hwc"`` puts its window axes first and the input feature last,
  ``"chw"`` the input feature first (as ``kernel_axes``); other ops keep their own order."""
  if order not in ACCUMULATION_ORDERS:
    raise ValueError(f"order must be one of {list(ACCUMULATION_ORDERS)}, got {order!r}")
  out_axes, in_axes = kernel_axes(op, dimension_numbers, ndim)
  if op == "conv" and order == "hwc":
    in_axes = (*in_axes[1:], in_axes[0])
  return out_axes, in_axes


def column_permutation(shape: tuple[int, ...], from_axes, to_axes) -> np.ndarray:
  """``[K]`` indices ``p`` such that ``to_rows(k, o, to_axes) == to_rows(k, o, from_axes)[:, p]``
  for a kernel ``k`` of ``shape`` (the same input axes, in two orders)."""
  if sorted(from_axes) != sorted(to_axes):
    raise ValueError(f"{tuple(to_axes)} is not an order of the input axes {tuple(from_axes)}")
  index = np.arange(math.prod(shape[a] for a in from_axes)).reshape([shape[a] for a in from_axes])
  return index.transpose([list(from_axes).index(a) for a in to_axes]).reshape(-1)


def to_rows(kernel: jax.Array, out_axes, in_axes) -> jax.Array:
  """The kernel as ``[output channels, inputs]``."""
  moved = jnp.transpose(kernel, (*out_axes, *in_axes))
  out = math.prod(kernel.shape[a] for a in out_axes)
  return moved.reshape(out, -1)


def from_rows(rows: jax.Array, shape: tuple[int, ...], out_axes, in_axes) -> jax.Array:
  """Inverse of ``to_rows`` for a kernel of ``shape``."""
  order = (*out_axes, *in_axes)
  moved = rows.reshape([shape[a] for a in order])
  return jnp.transpose(moved, [order.index(d) for d in range(len(shape))])


def tiles_of(rows: jax.Array, tile: int) -> jax.Array:
  """``[OC, K]`` rows as ``[OC, tiles, tile]`` (multi-stage accumulation), the last tile
  zero-padded."""
  oc, k = rows.shape
  n = math.ceil(k / tile)
  return jnp.pad(rows, ((0, 0), (0, n * tile - k))).reshape(oc, n, tile)


def scale_rows(
  scale: jax.Array, spec: QuantSpec, shape: tuple[int, ...], out_axes, in_axes
) -> jax.Array:
  """The weight scales as ``[output channels, column groups]``: one column for per-tensor
  and per-channel scales, ``inputs / group_size`` columns for scales per group of inputs
  (column ``j`` uses group ``j // group_size``).

  Raises:
    ValueError: for scales that differ along the inputs in another way (per-channel over an
      input axis, or groups along an output axis or across several input axes).
  """
  out = math.prod(shape[a] for a in out_axes)
  scale = jnp.asarray(scale, jnp.float32)
  if spec.granularity == "tensor":
    return jnp.broadcast_to(jnp.reshape(scale, (1, 1)), (out, 1))
  axes = granularity.normalize_axes(spec.axis, len(shape))
  if spec.granularity == "channel" and axes == tuple(sorted(out_axes)):
    return jnp.reshape(scale, (out, 1))
  if spec.granularity == "group" and axes == tuple(in_axes):
    grouped = list(shape)
    grouped[axes[0]] //= spec.group_size
    return to_rows(jnp.reshape(scale, grouped), out_axes, in_axes)
  raise ValueError(
    f"weight scales with granularity={spec.granularity!r} over axis {spec.axis!r} of a kernel"
    f" with output axes {tuple(out_axes)} and input axes {tuple(in_axes)}: rows need scales per"
    " tensor, per output channel, or per group along the single input axis"
  )
