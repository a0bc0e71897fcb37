"""GPFQ: greedy path following. Each column is chosen so that the quantized layer's running
output on its own (quantized) inputs tracks the float layer's output on float inputs.

With ``X~`` the quantized model's inputs to the layer and ``X`` the float model's, and the
running error ``u_{t-1} = sum_{j<t} (w_j X_j - q_j X~_j)``, column ``t`` is

  q_t = Q( <X~_t, u_{t-1} + w_t X_t> / |X~_t|^2 )
      = Q( D[t] w_t + sum_{j<t} Lg[t, j] w_j - sum_{j<t} Lh[t, j] q_j )

in closed form over ``H = X~^T X~`` and ``G = X~^T X``: ``D = diag(G) / diag(H)``,
``Lg = diag(H)^-1 tril(G, -1)``, ``Lh = diag(H)^-1 tril(H, -1)``. The first two terms are one
triangular matrix product for all columns; the last is fed back column by column
(``efqat_jax.ptq.columns``), so no step re-quantizes the whole matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from efqat_jax.ptq.columns import ColumnRounder, round_columns
from efqat_jax.ptq.optq import column_order, dead_inputs

HIGHEST = lax.Precision.HIGHEST


def strictly_lower_product(weight: jax.Array, lower: jax.Array, block_size: int) -> jax.Array:
  """``weight @ tril(lower, -1).T`` without the products above the diagonal (half the work of
  the dense product): each half of the columns recursively, plus the left half's part of the
  right half as one dense product."""
  n = weight.shape[1]
  if n <= block_size:
    return jnp.matmul(weight, jnp.tril(lower, -1).T, precision=HIGHEST)
  half = n // 2
  left = strictly_lower_product(weight[:, :half], lower[:half, :half], block_size)
  right = strictly_lower_product(weight[:, half:], lower[half:, half:], block_size)
  right = right + jnp.matmul(weight[:, :half], lower[half:, :half].T, precision=HIGHEST)
  return jnp.concatenate([left, right], axis=1)


def gpfq(
  weight: jax.Array,
  h: jax.Array,
  g: jax.Array,
  rounder: ColumnRounder,
  act_order: bool,
  block_size: int,
) -> jax.Array:
  """GPFQ on one weight matrix.

  Args:
    weight: ``[OC, K]`` float weights, one row per output channel.
    h: ``[K, K]``, ``X~^T X~`` (quantized inputs).
    g: ``[K, K]``, ``X~^T X`` (quantized times float inputs), with the same scaling as ``h``.
    rounder: maps a column to grid values (``grid_rounder``, or AXE's constrained rounder).
    act_order: process columns by ``diag(H)`` descending.
    block_size: columns per block of the lazy feedback.

  Returns:
    ``[OC, K]`` grid values (float units); inputs that never fire get zeros.
  """
  weight, h, g = (x.astype(jnp.float32) for x in (weight, h, g))
  dead = dead_inputs(h)
  order = column_order(h, act_order)
  weight, h, g = weight[:, order], h[order][:, order], g[order][:, order]
  norms = jnp.where(dead[order], 1.0, jnp.diagonal(h))
  lg = g / norms[:, None]
  lh = jnp.tril(h, -1) / norms[:, None]
  arguments = weight * (jnp.diagonal(g) / norms) + strictly_lower_product(weight, lg, block_size)
  arguments = jnp.where(dead[order][None, :], 0.0, arguments)
  k = h.shape[0]
  zeros, ones = jnp.zeros((k,), jnp.float32), jnp.ones((k,), jnp.float32)
  values = round_columns(arguments, lh.T, zeros, ones, order, rounder, block_size)
  return values[:, jnp.argsort(order)]
