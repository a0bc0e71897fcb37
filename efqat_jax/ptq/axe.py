"""AXE: accumulator-aware rounding inside OPTQ and GPFQ, for one P-bit accumulator per output
channel or one per tile of ``T`` inputs (multi-stage accumulation).

Two constraints act on every column's argument before it is rounded, per output channel and tile:
- a soft one: the argument is shrunk towards zero by ``lambda``, the threshold of the Euclidean
  projection of the zero-centred integer weights onto the l1 ball of radius
  ``(2^P - 2) / (nu - mu)`` (Duchi et al. 2008), computed once per layer;
- a hard one: with ``p`` and ``n`` the sums of the positive and negative integer weights chosen so
  far in the tile, the argument is clamped so that the tile's sum can never leave
  ``[-(2^(P-1) - 1), 2^(P-1) - 1]`` for any integer inputs in ``[mu, nu]``:
  ``nu p + mu n <= A`` and ``mu p + nu n >= -A``.
The hard bounds are integer floor divisions of the remaining budget, so the guarantee is exact.
Inputs are the layer's integer inputs; asymmetric inputs count as unsigned (their zero-point
correction is a separate term, see ``efqat_jax.quant.integer``). Columns are in accumulation
order (``efqat_jax.quant.rows.summation_axes``): tile ``t`` is columns ``t*T .. t*T + T - 1``.

Dead inputs (never non-zero in calibration: ``H[t, t] = 0``) get zero weights, so they use no
accumulator budget; the soft threshold is computed with their weights at zero, like the padding
of a short last tile. (Brevitas's reference, ``src/brevitas_examples/common/axe.py``, computes
its thresholds before it zeroes dead columns, so the float weight of a dead input, which ends at
zero, still moves the threshold of the live weights in its tile, usually up; here it does not.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from efqat_jax.ptq.columns import ColumnRounder
from efqat_jax.quant.accumulator import AccumulatorSpec, input_range, zero_centred_l1_limit
from efqat_jax.quant.rows import tiles_of
from efqat_jax.quant.spec import QuantSpec


def l1_ball_threshold(v: jax.Array, radius: float) -> jax.Array:
  """The soft threshold ``theta`` that projects each row of ``v`` (``[..., T]``) onto the l1
  ball of ``radius``: ``sign(v) max(|v| - theta, 0)`` (0 where the row is inside the ball).

  Michelot's iteration, no sort: ``theta <- (sum of |v| above theta - radius) / their count``
  rises monotonically from ``(|v|_1 - radius) / T`` to the exact threshold in a few steps.
  """
  u = jnp.abs(v)

  def update(theta):
    active = u > theta[..., None]
    count = jnp.maximum(jnp.sum(active, axis=-1), 1)
    return (jnp.sum(jnp.where(active, u, 0.0), axis=-1) - radius) / count

  def unsettled(state):
    theta, previous, steps = state
    return jnp.any(theta != previous) & (steps < v.shape[-1])

  def step(state):
    theta, _, steps = state
    return jnp.maximum(update(theta), theta), theta, steps + 1

  start = (jnp.sum(u, axis=-1) - radius) / v.shape[-1]
  theta, _, _ = lax.while_loop(unsettled, step, (start, start - 1.0, 0))
  return jnp.where(jnp.sum(u, axis=-1) <= radius, 0.0, jnp.maximum(theta, 0.0))


def soft_thresholds(
  weight: jax.Array, scales: jax.Array, group_size: int, tile: int, radius: float
) -> jax.Array:
  """``[OC, tiles]`` thresholds ``lambda`` in float units for each output channel and tile."""
  column_scales = jnp.repeat(scales, group_size, axis=1)[:, : weight.shape[1]]
  blocks = tiles_of(weight / column_scales, tile)
  centred = blocks - jnp.mean(blocks, axis=-1, keepdims=True)
  theta = l1_ball_threshold(centred, radius)
  return theta * tiles_of(column_scales, tile)[..., 0]


def budget_bounds(p, n, mu: int, nu: int, limit: int) -> tuple[jax.Array, jax.Array]:
  """The integer range ``[lower, upper]`` a new weight may take so that a tile with sums
  ``(p, n)`` keeps ``nu p + mu n <= A`` and ``mu p + nu n >= -A`` (int32 arithmetic)."""
  up = limit - nu * p - mu * n  # >= 0: room above, for a positive weight
  down = limit + mu * p + nu * n  # >= 0: room below, for a negative weight
  upper, lower = up // nu, -(down // nu)
  if mu < 0:
    upper = jnp.minimum(upper, down // -mu)
    lower = jnp.maximum(lower, -(up // -mu))
  return jnp.minimum(lower, 0), jnp.maximum(upper, 0)


def accumulator_rounder(
  weight: jax.Array,
  scales: jax.Array,
  group_size: int,
  qmin: int,
  qmax: int,
  input_spec: QuantSpec,
  accumulator: AccumulatorSpec,
  dead: jax.Array | None = None,
) -> ColumnRounder:
  """The AXE rounder for one weight matrix.

  Args:
    weight: ``[OC, K]`` float weights in accumulation order (for the soft threshold).
    scales: ``[OC, groups]`` weight scales; column ``j`` uses ``scales[:, j // group_size]``.
    group_size: columns per scale group (``K`` for one scale per row).
    qmin, qmax: the weight grid.
    input_spec: the integer inputs' format (their range ``[mu, nu]``).
    accumulator: ``P`` (3..32) and the inputs per tile (None: one accumulator over all ``K``).
    dead: ``[K]`` bool, the inputs that never fire (their weights count as zero in the soft
      threshold); None: none.
  """
  tile = accumulator.tile_size(weight.shape[1])
  mu, nu = input_range(input_spec)
  limit = accumulator.limit
  radius = zero_centred_l1_limit(accumulator.bits, input_spec)
  if dead is not None:
    weight = jnp.where(dead[None, :], 0.0, weight)
  # Tile-major layouts, so that one column's tile is a contiguous row.
  thresholds = soft_thresholds(weight, scales, group_size, tile, radius).T
  by_group = scales.T
  zeros = jnp.zeros(thresholds.shape, jnp.int32)

  def round_column(v, column, state):
    p, n = state
    t = column // tile
    s = by_group[column // group_size]
    lam = thresholds[t]
    a = jnp.sign(v) * jnp.maximum(jnp.abs(v) - lam, 0.0)
    lower, upper = budget_bounds(p[t], n[t], mu, nu, limit)
    a = jnp.clip(a, s * lower, s * upper)
    q = jnp.clip(jnp.round(a / s), jnp.maximum(lower, qmin), jnp.minimum(upper, qmax))
    q = q.astype(jnp.int32)
    p, n = p.at[t].add(jnp.maximum(q, 0)), n.at[t].add(jnp.minimum(q, 0))
    return a, s * q.astype(jnp.float32), (p, n)

  return ColumnRounder((zeros, zeros), round_column)
