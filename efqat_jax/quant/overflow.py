"""The overflow proof of an exported layer: ``check_accumulator`` proves, exactly, that no
partial sum of a layer's integer weights leaves a P-bit accumulator (per tile of inputs, in a
given accumulation order) for any integer inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from efqat_jax.quant import accumulator as accum
from efqat_jax.quant.accumulator import AccumulatorSpec
from efqat_jax.quant.integer import IntegerLayer
from efqat_jax.quant.rows import summation_axes, to_rows


@dataclasses.dataclass(frozen=True)
class OverflowReport:
  """Whether a layer's integer weights can overflow an accumulator, for any integer inputs.

  Attributes:
    fits: no partial sum of any output channel (and tile) leaves ``[-limit, limit]``.
    accumulator_bits: the accumulator width P checked.
    tile: inputs per accumulator (K: one accumulator per output channel).
    order: the accumulation order the tiles were taken in (``AccumulatorSpec.order``).
    datatype_bound: P* for the tile length and the input and weight bits: safe for any weights.
    needed_bits: the smallest P these weights fit (the largest over channels and tiles).
    worst_partial_sum: the largest ``|partial sum|`` adversarial inputs reach.
    limit: ``2^(P-1) - 1``.
  """

  fits: bool
  accumulator_bits: int
  tile: int
  order: str
  datatype_bound: int
  needed_bits: int
  worst_partial_sum: int
  limit: int


def check_accumulator(layer: IntegerLayer, accumulator: AccumulatorSpec) -> OverflowReport:
  """Checks a layer's integer weights against a P-bit accumulator, exactly.

  The sum bound and an integer simulation with adversarial inputs are both evaluated per output
  channel and tile, the inputs taken in ``accumulator.order``; they must agree. Group-wise
  weights are not tiled automatically: pass ``tile=group_size`` for one accumulator per group.

  Args:
    layer: an exported layer with integer inputs (a dot_general or conv).
    accumulator: the accumulator width and, for multi-stage accumulation, the tile size and
      the order the inputs are summed in.

  Returns:
    An OverflowReport.

  Raises:
    ValueError: for an embedding lookup or a weight-only layer (no integer accumulation).
  """
  if not layer.accumulates:
    kind = "an embedding lookup (op='take')" if layer.op == "take" else f"a weight-only {layer.op}"
    raise ValueError(f"check_accumulator needs integer inputs; {kind} has no integer accumulation")
  out_axes, in_axes = summation_axes(
    layer.op, layer.dimension_numbers, layer.weight.ndim, accumulator.order
  )
  rows = np.asarray(to_rows(layer.weight, out_axes, in_axes), np.int64)
  k = rows.shape[1]
  tile = accumulator.tile_size(k)
  mu, nu = accum.input_range(layer.input_spec)
  p, n = accum.tile_sums(rows, tile)
  bound = accum.fits(p, n, mu, nu, accumulator.bits)
  worst = accum.worst_partial_sums(rows, mu, nu, tile)
  simulated = worst <= accumulator.limit
  if not np.array_equal(bound, simulated):
    raise AssertionError(
      f"accumulator bound and simulation disagree for {int(np.sum(bound != simulated))} of"
      f" {bound.size} (channel, tile) pairs"
    )
  return OverflowReport(
    fits=bool(bound.all() and simulated.all()),
    accumulator_bits=accumulator.bits,
    tile=tile,
    order=accumulator.order,
    datatype_bound=accum.datatype_bound(min(tile, k), layer.input_spec, layer.weight_spec.bits),
    needed_bits=int(accum.required_bits(p, n, mu, nu).max(initial=2)),
    worst_partial_sum=int(worst.max(initial=0)),
    limit=accumulator.limit,
  )


def check_accumulators(
  layers: Mapping[str, IntegerLayer], accumulator: AccumulatorSpec
) -> dict[str, OverflowReport]:
  """``check_accumulator`` for every layer with integer inputs (embedding lookups and
  weight-only layers are left out)."""
  return {
    name: check_accumulator(layer, accumulator)
    for name, layer in layers.items()
    if layer.accumulates
  }
