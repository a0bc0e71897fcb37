"""Re-check the accumulator promise of an integer export from the file alone (numpy only).

The pipeline's ``export`` stage writes ``export/layers.npz``. For every layer (``<unit>``, e.g.
``Conv_1`` or ``blocks/Dense_0[2]``) it holds ``<unit>/weight``, the integer kernel, and what an
accumulator proof needs to know about it:

- ``<unit>/op``, ``<unit>/kernel_output_axes``, ``<unit>/kernel_input_axes``: the op
  (``"conv"``, ``"dot_general"``, ``"take"``), the weight axes that index output channels and
  those summed over, in the op's order (a convolution's input channel first, then its window);
- ``<unit>/input_min``, ``<unit>/input_max`` (layers with integer inputs): the integer input
  range the proof assumes, the full grid of ``input_bits`` / ``input_signed``. An asymmetric
  input enters unshifted (unsigned); its zero point is subtracted outside the accumulator;
- ``<unit>/accumulator_bits``, ``<unit>/accumulator_tile``, ``<unit>/accumulation_order``
  (layers made to fit an accumulator, e.g. by AXE): a signed P-bit accumulator, used as
  ``[-(2^(P-1) - 1), 2^(P-1) - 1]``, sums each run of ``accumulator_tile`` consecutive inputs
  in the accumulation order. For a convolution, ``"hwc"`` takes the inputs kernel row by kernel
  row, then kernel column, input channel fastest (NHWC im2col, Flax's HWIO kernels); ``"chw"``
  input channel slowest (NCHW im2col, PyTorch's OIHW kernels). Another op sums its inputs in the
  recorded order whatever the field says.

``check_export_accumulators`` re-checks every layer with an accumulator: the weights as rows (one
per output channel, the inputs in the recorded order) cut into tiles, and per tile the worst
partial sum over every input in ``[input_min, input_max]``. With ``p`` and ``n`` a tile's sums of
positive and of negative weights, each product ``q * x`` can be pushed to its largest (or
smallest) value independently, and since the range contains 0 a longer run only adds to it:
the worst partial sum is ``max(input_max * p + input_min * n, -(input_min * p + input_max * n))``,
reached at the tile's end. The layer keeps its promise if that fits for every tile.

This module imports nothing but numpy and the standard library: copy it next to an export and run

  python export_check.py workdir/export/layers.npz

which prints one line per layer and exits with status 1 if a layer can overflow.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

ORDERS = ("hwc", "chw")


@dataclasses.dataclass(frozen=True)
class AccumulatorCheck:
  """One layer's re-checked accumulator promise.

  Attributes:
    fits: no tile's partial sum can leave the accumulator, for any recorded input.
    accumulator_bits: P, as recorded.
    tile: inputs per accumulator, as recorded.
    order: the accumulation order, as recorded.
    worst_partial_sum: the largest ``|partial sum|`` over every tile and input.
    limit: ``2^(P-1) - 1``.
    overflowing_tiles: how many (output channel, tile) pairs can overflow, of ``tiles``.
    tiles: the number of (output channel, tile) pairs.
    problem: why the layer fails, in words ("" if it fits).
  """

  fits: bool
  accumulator_bits: int
  tile: int
  order: str
  worst_partial_sum: int
  limit: int
  overflowing_tiles: int
  tiles: int
  problem: str


def summed_axes(op: str, input_axes, order: str) -> tuple[int, ...]:
  """The kernel's input axes in the order they are summed (slowest first)."""
  if order not in ORDERS:
    raise ValueError(f"accumulation_order {order!r} is not one of {list(ORDERS)}")
  input_axes = tuple(int(a) for a in input_axes)
  if op == "conv" and order == "hwc":
    return (*input_axes[1:], input_axes[0])
  return input_axes


def weight_rows(weight: np.ndarray, output_axes, input_axes) -> np.ndarray:
  """``[output channels, inputs]`` int64 rows, the inputs in ``input_axes`` order."""
  axes = [int(a) for a in (*output_axes, *input_axes)]
  if sorted(axes) != list(range(weight.ndim)):
    raise ValueError(
      f"kernel axes {axes} are not the {weight.ndim} axes of a weight of shape {weight.shape}"
    )
  out = int(np.prod([weight.shape[int(a)] for a in output_axes], dtype=np.int64))
  return np.transpose(weight.astype(np.int64), axes).reshape(out, -1)


def worst_tile_sums(rows: np.ndarray, tile: int, lo: int, hi: int) -> np.ndarray:
  """``[rows, tiles]``: each tile's largest ``|partial sum|`` for inputs in ``[lo, hi]``
  (``lo <= 0 <= hi``); the last tile may be shorter."""
  k = rows.shape[1]
  tiles = -(-k // tile)
  padded = np.pad(rows, ((0, 0), (0, tiles * tile - k))).reshape(rows.shape[0], tiles, tile)
  p, n = np.maximum(padded, 0).sum(-1), np.minimum(padded, 0).sum(-1)
  return np.maximum(hi * p + lo * n, -(lo * p + hi * n))


def input_grid(bits: int, signed: bool) -> tuple[int, int]:
  """The integer range of a ``bits``-bit input format, the full (non-narrow) grid."""
  return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def check_layer(arrays, unit: str) -> AccumulatorCheck:
  """Re-checks one layer ``unit`` of an opened export (``np.load`` of ``layers.npz``)."""

  def field(name):
    key = f"{unit}/{name}"
    if key not in arrays:
      raise ValueError(f"{unit}: the export has no {key}, so its accumulator cannot be checked")
    return arrays[key]

  bits, tile = int(field("accumulator_bits")), int(field("accumulator_tile"))
  order, op = str(field("accumulation_order")), str(field("op"))
  lo, hi = int(field("input_min")), int(field("input_max"))
  if not 2 <= bits <= 64 or tile < 1:
    raise ValueError(f"{unit}: accumulator_bits = {bits}, accumulator_tile = {tile} are not valid")
  axes = summed_axes(op, field("kernel_input_axes"), order)
  rows = weight_rows(np.asarray(field("weight")), field("kernel_output_axes"), axes)
  worst = worst_tile_sums(rows, tile, lo, hi) if lo <= 0 <= hi else np.zeros((0, 0), np.int64)
  limit = 2 ** (bits - 1) - 1
  grid = input_grid(int(field("input_bits")), bool(field("input_signed")))
  problem = ""
  if not lo <= 0 <= hi:
    problem = f"the recorded input range [{lo}, {hi}] does not contain 0"
  elif lo > grid[0] or hi < grid[1]:
    problem = f"the recorded input range [{lo}, {hi}] does not cover the input grid {list(grid)}"
  elif (worst > limit).any():
    problem = f"{int((worst > limit).sum())} tiles can reach {int(worst.max())} > {limit}"
  return AccumulatorCheck(
    fits=not problem,
    accumulator_bits=bits,
    tile=tile,
    order=order,
    worst_partial_sum=int(worst.max(initial=0)),
    limit=limit,
    overflowing_tiles=int((worst > limit).sum()),
    tiles=int(worst.size),
    problem=problem,
  )


def check_export_accumulators(path) -> dict[str, AccumulatorCheck]:
  """Re-checks every layer of an export that records an accumulator, from the file alone.

  Args:
    path: ``export/layers.npz`` (a path or an open binary file).

  Returns:
    ``{unit: AccumulatorCheck}`` for every layer with ``accumulator_bits`` (empty if none).

  Raises:
    ValueError: a layer with an accumulator lacks a field the check needs, or records an
      unknown accumulation order.

  Example:
    >>> checks = check_export_accumulators("workdir/export/layers.npz")
    >>> [unit for unit, c in checks.items() if not c.fits]
    []
  """
  with np.load(path, allow_pickle=False) as arrays:
    units = [k.rpartition("/")[0] for k in arrays.files if k.endswith("/accumulator_bits")]
    return {unit: check_layer(arrays, unit) for unit in units}


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print(f"usage: {argv[0]} export/layers.npz", file=sys.stderr)
    return 2
  checks = check_export_accumulators(argv[1])
  if not checks:
    print(f"{argv[1]}: no layer records an accumulator (nothing was promised)")
  for unit, c in checks.items():
    verdict = "fits" if c.fits else f"CAN OVERFLOW: {c.problem}"
    print(
      f"{unit}: {c.accumulator_bits}-bit accumulator, tiles of {c.tile} in {c.order} order,"
      f" worst partial sum {c.worst_partial_sum} of {c.limit}: {verdict}"
    )
  return 0 if all(c.fits for c in checks.values()) else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv))
