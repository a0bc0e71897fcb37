"""Column-by-column rounding with feedback: the engine OPTQ and GPFQ share.

Both quantize a weight matrix ``[output channels, inputs]`` one input column at a time, for all
output channels at once, and feed each column's result forward into the columns after it:

  for t in columns:  a, q = round(A[:, t]);  c = alpha[t] * a + beta[t] * q
                     A[:, t'] -= c * F[t, t']   for every t' > t

OPTQ feeds back the scaled error (``c = (a - q) / U[t, t]``, ``F = U``, the upper Cholesky factor
of ``H^-1``); GPFQ feeds back the chosen values (``c = q``, ``F = L_h^T``). The updates are lazy and blocked:
within a block of columns they are applied column by column; between blocks, recursively, the
left half of a range feeds the right half in one matrix product (each entry of ``F`` above the
diagonal is used once, and no step touches the columns already done).

A ``ColumnRounder`` turns a column's arguments into grid values and may keep state across
columns (AXE's running sums of the accumulator constraint).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST  # no reduced-precision matmuls (TF32 on GPUs) in the feedback


@dataclasses.dataclass(frozen=True)
class ColumnRounder:
  """How one column's arguments become grid values.

  Attributes:
    init: the state before the first column (any pytree; ``()`` for none).
    round: ``(arguments [OC], column, state) -> (projected arguments, values, state)``;
      ``column`` is the column's index in the weight's own order (int32 scalar, before any
      reordering), ``values`` are on the grid (float units), and ``projected`` is the argument
      after any constraint, before rounding.
  """

  init: Any
  round: Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, jax.Array, Any]]


def grid_rounder(scales: jax.Array, group_size: int, qmin: int, qmax: int) -> ColumnRounder:
  """Round to nearest on the grid ``scales * [qmin, qmax]``.

  Args:
    scales: ``[OC, groups]``; column ``j`` uses ``scales[:, j // group_size]``.
    group_size: columns per scale group (the number of columns for one scale per row).
    qmin, qmax: the integer grid.
  """

  by_group = scales.T  # one group's scales contiguous

  def round_column(v, column, state):
    s = by_group[column // group_size]
    return v, s * jnp.clip(jnp.round(v / s), qmin, qmax), state

  return ColumnRounder((), round_column)


def round_columns(
  arguments: jax.Array,
  feedback: jax.Array,
  alpha: jax.Array,
  beta: jax.Array,
  order: jax.Array,
  rounder: ColumnRounder,
  block_size: int,
) -> jax.Array:
  """Rounds the columns of ``arguments`` in turn, feeding each forward (see the module doc).

  Args:
    arguments: ``[OC, K]`` float32, the columns in processing order.
    feedback: ``[K, K]``; only entries above the diagonal are used.
    alpha, beta: ``[K]``, the feedback's weights on the projected arguments and on the values.
    order: ``[K]`` int32, each processed column's index in the weight's own order (passed to
      the rounder).
    rounder: see ``ColumnRounder``.
    block_size: columns per block of lazy updates.

  Returns:
    ``[OC, K]`` grid values, in processing order.
  """
  oc, k = arguments.shape
  b = max(1, min(block_size, k))
  blocks = math.ceil(k / b)
  pad = blocks * b - k
  if pad:
    arguments = jnp.pad(arguments, ((0, 0), (0, pad)))
    feedback = jnp.pad(feedback, ((0, pad), (0, pad)))
    alpha, beta = jnp.pad(alpha, (0, pad)), jnp.pad(beta, (0, pad))
    order = jnp.pad(order, (0, pad), constant_values=k - 1)  # zero columns round to zero

  def block(part, lo, state):
    """One block of ``b`` columns, fed forward column by column."""
    local = feedback[lo : lo + b, lo : lo + b]

    def column(j, carry):
      part, q_block, c_block, state = carry
      v = lax.dynamic_index_in_dim(part, j, axis=1, keepdims=False)
      a, q, state = rounder.round(v, order[lo + j], state)
      c = alpha[lo + j] * a + beta[lo + j] * q
      # Columns up to j are done: updating them too keeps the slice static.
      part = part - c[:, None] * lax.dynamic_index_in_dim(local, j, axis=0)
      q_block = lax.dynamic_update_index_in_dim(q_block, q, j, axis=1)
      c_block = lax.dynamic_update_index_in_dim(c_block, c, j, axis=1)
      return part, q_block, c_block, state

    zeros = jnp.zeros((oc, b), arguments.dtype)
    _, q_block, c_block, state = lax.fori_loop(0, b, column, (part, zeros, zeros, state))
    return q_block, c_block, state

  def columns(part, lo, state):
    """Columns ``lo..`` of ``part``: the left half, its feedback into the right half as one
    matrix product, then the right half (recursively, so every update is applied once)."""
    n = part.shape[1]
    if n == b:
      return block(part, lo, state)
    half = b * math.ceil(n // b / 2)
    q_left, c_left, state = columns(part[:, :half], lo, state)
    right = part[:, half:] - jnp.matmul(
      c_left, feedback[lo : lo + half, lo + half : lo + n], precision=HIGHEST
    )
    q_right, c_right, state = columns(right, lo + half, state)
    return (jnp.concatenate([q_left, q_right], 1), jnp.concatenate([c_left, c_right], 1), state)

  values, _, _ = columns(arguments, 0, rounder.init)
  return values[:, :k]
