"""Accumulator-aware numerics (AXE): can integer dot products overflow a P-bit accumulator?

Integer inputs lie in ``[mu, nu]`` (a range that contains 0) and each output channel's integer
weights form a row ``q`` in accumulation order. A P-bit signed accumulator is treated as the
symmetric range ``[-A, A]``, ``A = 2^(P-1) - 1``. With ``p`` the sum of a row's positive weights
and ``n`` the sum of its negative ones, every partial sum stays in range, for any inputs and any
order, iff ``nu*p + mu*n <= A`` and ``mu*p + nu*n >= -A``. Multi-stage accumulation sums each
tile of ``T`` consecutive inputs in its own P-bit accumulator, so the condition holds per tile, and
which inputs share a tile depends on the order the inputs are summed in: for a convolution,
``"hwc"`` (kernel row, kernel column, then input channel fastest: NHWC im2col, Flax's HWIO
kernels) or ``"chw"`` (input channel slowest: NCHW im2col, PyTorch's OIHW kernels). Weights whose
tiles fit in one order can overflow in the other.

All arithmetic is exact (Python ints and numpy int64).

Example:
  >>> datatype_bound(128, QuantSpec.for_activations(4), 4)  # enough for any 4-bit weights
  16
  >>> p, n = tile_sums(rows, tile=64)                       # rows: [OC, K] integer weights
  >>> required_bits(p, n, *input_range(QuantSpec.for_activations(4))).max()
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from efqat_jax.quant.spec import QuantSpec

# 2^0 .. 2^62: the int64 powers of two, for an exact bit length of a non-negative int64.
_POWERS = np.left_shift(np.int64(1), np.arange(63, dtype=np.int64))

# The orders a convolution's inputs can be summed in, slowest axis first (h, w: the kernel window,
# all its spatial axes in order; c: the input channel). A dense layer's order is its own.
ACCUMULATION_ORDERS = ("hwc", "chw")


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class AccumulatorSpec:
  """A signed P-bit accumulator, used for a whole row or tile by tile.

  Attributes:
    bits: the accumulator width P, 3..64.
    tile: inputs summed per accumulator before the partial results are combined
      (multi-stage accumulation), at least 3; None: one accumulator per output channel.
    order: the order a convolution's inputs are summed in, one of ``ACCUMULATION_ORDERS``:
      tiles are runs of ``tile`` consecutive inputs in this order (irrelevant without tiles).
  """

  bits: int
  tile: int | None = None
  order: str = "hwc"

  def __post_init__(self):
    if not _is_int(self.bits) or not 3 <= self.bits <= 64:
      raise ValueError(f"AccumulatorSpec.bits must be an integer in 3..64, got {self.bits!r}")
    object.__setattr__(self, "bits", int(self.bits))
    if self.tile is not None:
      if not _is_int(self.tile) or self.tile < 3:
        raise ValueError(f"AccumulatorSpec.tile must be None or an integer >= 3, got {self.tile!r}")
      object.__setattr__(self, "tile", int(self.tile))
    if self.order not in ACCUMULATION_ORDERS:
      raise ValueError(
        f"AccumulatorSpec.order must be one of {list(ACCUMULATION_ORDERS)}, got {self.order!r}"
      )

  @property
  def limit(self) -> int:
    """The largest magnitude the accumulator holds, ``2^(bits-1) - 1``."""
    return 2 ** (self.bits - 1) - 1

  def tile_size(self, k: int) -> int:
    """Inputs per accumulator for rows of ``k`` inputs (a tile longer than ``k`` is one tile)."""
    return k if self.tile is None else self.tile


def input_range(spec: QuantSpec) -> tuple[int, int]:
  """``(mu, nu)``: the integer input range, the full (non-narrow) grid as the worst case."""
  if spec.signed:
    return -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
  return 0, 2**spec.bits - 1


def datatype_bound(k: int, input_spec: QuantSpec, weight_bits: int) -> int:
  """The accumulator width that no ``weight_bits``-bit weights can overflow.

  ``P* = ceil(alpha + log2(1 + 2^-alpha) + 1)`` with
  ``alpha = log2(k) + N + M - 1 - [inputs signed]``, computed exactly as
  ``bit_length(2^alpha) + 1``.

  Args:
    k: inputs per accumulator.
    input_spec: the input format (N = ``input_spec.bits``).
    weight_bits: M.

  Returns:
    P*.
  """
  if not _is_int(k) or k < 1 or not _is_int(weight_bits) or weight_bits < 1:
    raise ValueError(
      f"datatype_bound needs k >= 1 and weight_bits >= 1, got {k!r}, {weight_bits!r}"
    )
  worst = int(k) << (input_spec.bits + int(weight_bits) - 1 - int(input_spec.signed))
  return worst.bit_length() + 1


def zero_centred_l1_limit(bits: int, input_spec: QuantSpec) -> float:
  """AXE's l1-norm limit ``(2^P - 2) / (nu - mu)``: a row summing to 0 with an l1 norm at most
  this fits a ``bits``-bit accumulator."""
  mu, nu = input_range(input_spec)
  return (2**bits - 2) / (nu - mu)


def _tiled(q_rows, tile: int | None) -> np.ndarray:
  """``q_rows`` ``[OC, K]`` as int64 ``[OC, tiles, T]``, the last tile padded with zeros."""
  q = np.asarray(q_rows, np.int64)
  if q.ndim != 2:
    raise ValueError(f"q_rows must be a 2-D [output channels, inputs] array, got shape {q.shape}")
  if tile is not None and (not _is_int(tile) or tile < 1):
    raise ValueError(f"tile must be None or a positive integer, got {tile!r}")
  k = q.shape[1]
  t = max(k, 1) if tile is None else int(tile)
  tiles = -(-k // t)
  q = np.pad(q, ((0, 0), (0, tiles * t - k)))
  return q.reshape(q.shape[0], tiles, t)


def tile_sums(q_rows, tile: int | None) -> tuple[np.ndarray, np.ndarray]:
  """Sums of the positive and of the negative weights per row and tile.

  Args:
    q_rows: integer weights ``[OC, K]`` in accumulation order.
    tile: inputs per tile; None: the whole row.

  Returns:
    ``(p, n)``: int64 ``[OC, tiles]``, ``p >= 0`` and ``n <= 0``.
  """
  q = _tiled(q_rows, tile)
  return np.maximum(q, 0).sum(-1), np.minimum(q, 0).sum(-1)


def _bounds(mu, nu) -> tuple[int, int]:
  mu, nu = int(mu), int(nu)
  if not mu <= 0 <= nu:
    raise ValueError(f"the input range [mu, nu] must contain 0, got [{mu}, {nu}]")
  return mu, nu


def _extremes(p, n, mu, nu) -> tuple[np.ndarray, np.ndarray]:
  """The largest and the smallest sum inputs in ``[mu, nu]`` reach."""
  mu, nu = _bounds(mu, nu)
  p, n = np.asarray(p, np.int64), np.asarray(n, np.int64)
  return nu * p + mu * n, mu * p + nu * n


def _limit(bits) -> np.ndarray:
  """``2^(bits-1) - 1`` in int64, written so that bits = 64 does not overflow."""
  half = np.left_shift(np.int64(1), np.asarray(bits, np.int64) - 2)
  return (half - 1) + half


def fits(p, n, mu, nu, bits) -> np.ndarray:
  """Whether every partial sum stays within a ``bits``-bit accumulator, elementwise.

  Args:
    p, n: sums of the positive and of the negative weights (see ``tile_sums``).
    mu, nu: the integer input range (containing 0).
    bits: accumulator width(s) P, 2..64, broadcast against ``p`` and ``n``.

  Returns:
    A bool array: ``nu*p + mu*n <= A`` and ``mu*p + nu*n >= -A``, ``A = 2^(P-1) - 1``.
  """
  hi, lo = _extremes(p, n, mu, nu)
  limit = _limit(bits)
  return (hi <= limit) & (lo >= -limit)


def required_bits(p, n, mu, nu) -> np.ndarray:
  """The smallest accumulator width ``P >= 2`` that ``fits``, elementwise (int64)."""
  hi, lo = _extremes(p, n, mu, nu)
  worst = np.maximum(hi, -lo)
  # A = 2^(P-1) - 1 >= worst  <=>  P - 1 >= bit_length(worst).
  bit_length = np.searchsorted(_POWERS, worst, side="right").astype(np.int64)
  return np.maximum(bit_length + 1, 2)


def worst_partial_sums(q_rows, mu, nu, tile: int | None) -> np.ndarray:
  """The largest ``|partial sum|`` adversarial inputs reach, by integer simulation.

  Per row and tile, two inputs are run through the accumulation in column order: ``x = nu``
  where ``q > 0`` and ``mu`` elsewhere (drives the sum up), and the reverse (drives it down).

  Args:
    q_rows: integer weights ``[OC, K]`` in accumulation order.
    mu, nu: the integer input range (containing 0).
    tile: inputs per accumulator; None: the whole row.

  Returns:
    int64 ``[OC, tiles]``: the largest magnitude of any prefix sum of either input.
  """
  mu, nu = _bounds(mu, nu)
  q = _tiled(q_rows, tile)
  up = np.cumsum(np.where(q > 0, nu, mu) * q, axis=-1)
  down = np.cumsum(np.where(q > 0, mu, nu) * q, axis=-1)
  return np.maximum(np.abs(up), np.abs(down)).max(axis=-1, initial=0)
