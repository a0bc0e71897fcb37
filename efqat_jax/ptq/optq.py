"""OPTQ (GPTQ): round one input column at a time and spread its error over the columns not yet
rounded, weighted by the inverse Hessian of the layer's reconstruction error.

For inputs ``X`` (rows are samples) the Hessian is ``H = X^T X``. With ``U`` the upper Cholesky
factor of ``(H + eta I)^-1``, column ``t``'s error ``e = (a_t - q_t) / U[t, t]`` updates every later
column ``t'`` by ``-e U[t, t']`` (``efqat_jax.ptq.columns``). Damping ``eta`` is relative to the mean
of ``diag(H)``; inputs that never fire (``H[t, t] = 0``) get zero weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from efqat_jax.ptq.columns import ColumnRounder, round_columns


def dead_inputs(h: jax.Array) -> jax.Array:
  """``[K]`` bool: inputs whose captured values were all zero."""
  return jnp.diagonal(h) <= 0


def column_order(h: jax.Array, act_order: bool) -> jax.Array:
  """The processing order: by ``diag(H)`` descending with ``act_order``, else as stored."""
  k = h.shape[0]
  return jnp.argsort(-jnp.diagonal(h), stable=True) if act_order else jnp.arange(k)


def inverse_cholesky_upper(h: jax.Array) -> jax.Array:
  """Upper-triangular ``U`` with ``U^T U = h^-1`` (``h`` symmetric positive definite).

  With ``J`` the reversal permutation and ``L`` the lower Cholesky factor of ``J h J``,
  ``U = J L^-1 J``: one factorisation and one triangular inverse, no explicit ``h^-1``.
  """
  k = h.shape[0]
  reversed_h = h[::-1, ::-1]
  lower = jnp.linalg.cholesky(reversed_h)
  inverse = solve_triangular(lower, jnp.eye(k, dtype=h.dtype), lower=True)
  return inverse[::-1, ::-1]


def optq(
  weight: jax.Array,
  h: jax.Array,
  rounder: ColumnRounder,
  damping: float,
  act_order: bool,
  block_size: int,
) -> jax.Array:
  """OPTQ on one weight matrix.

  Args:
    weight: ``[OC, K]`` float weights, one row per output channel.
    h: ``[K, K]`` Hessian ``X^T X`` of the layer's (quantized) inputs, any positive scaling.
    rounder: maps a column to grid values (``grid_rounder``, or AXE's constrained rounder).
    damping: ``eta / mean(diag H)``.
    act_order: process columns by ``diag(H)`` descending.
    block_size: columns per block of lazy updates.

  Returns:
    ``[OC, K]`` grid values (float units).
  """
  weight, h = weight.astype(jnp.float32), h.astype(jnp.float32)
  dead = dead_inputs(h)
  diagonal = jnp.where(dead, 1.0, jnp.diagonal(h))
  h = h.at[jnp.diag_indices_from(h)].set(diagonal)
  weight = jnp.where(dead[None, :], 0.0, weight)
  order = column_order(h, act_order)
  h = h[order][:, order]
  h = h + damping * jnp.mean(jnp.diagonal(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
  u = inverse_cholesky_upper(h)
  d = jnp.diagonal(u)
  values = round_columns(weight[:, order], u, 1.0 / d, -1.0 / d, order, rounder, block_size)
  return values[:, jnp.argsort(order)]
