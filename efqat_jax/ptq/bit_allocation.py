"""Per-layer weight bit widths under a memory budget: greedy on benefit per bit of memory.

Every free layer starts at the smallest candidate width. Raising layer ``l`` from ``b`` to the
next candidate ``b'`` lowers its quantization noise power (which falls as ``4^-b``) and so
gains ``importance[l] * (4^-b - 4^-b')`` for ``sizes[l] * (b' - b)`` bits of memory. The raise
with the largest gain per bit among those that still fit the budget is applied, again and again,
until none fits; ties go to the layer listed first in ``importance``.

Greedy by gain per bit avoids a combinatorial search over all assignments. As the gain per bit
of a layer falls with every raise (``4^-b`` is convex), each layer's raises come in the order a
search would want them, and of two layers of the same size the more important one gets at least
as many bits. The budget ends up used up to less than the cost of any single remaining raise.

Memory is counted exactly, in integer bits. ``fixed`` layers (e.g. the first and last at 8 bits)
keep their widths and are outside the budget.

Example:
  >>> allocate_bits({"a": 3.0, "b": 1.0}, {"a": 100, "b": 100}, [2, 4, 8], budget_bits=4)
  {'a': 4, 'b': 4}
  >>> allocate_bits({"a": 9.0, "b": 1.0}, {"a": 100, "b": 100}, [2, 3, 4], budget_bits=3)
  {'a': 4, 'b': 2}
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections.abc import Mapping, Sequence
from fractions import Fraction

MIN_BITS, MAX_BITS = 2, 16


def _check_width(what: str, bits) -> int:
  if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
    raise ValueError(f"{what} = {bits!r}: bit widths must be integers in {MIN_BITS}..{MAX_BITS}")
  if not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"{what} = {bits!r}: bit widths must be in {MIN_BITS}..{MAX_BITS}")
  return int(bits)


def _check_inputs(importance, sizes, candidates, budget_bits, fixed):
  """Validated ``(candidates, fixed, free layers, budget as an exact Fraction)``."""
  if not candidates:
    raise ValueError(f"candidates = {list(candidates)!r}: need at least one bit width")
  widths = sorted({_check_width("candidate", b) for b in candidates})
  fixed = {name: _check_width(f"fixed[{name!r}]", b) for name, b in dict(fixed or {}).items()}
  for name in fixed:
    if name not in importance:
      raise ValueError(
        f"fixed layer {name!r} is not among the layers with an importance: {list(importance)}"
      )
  for name, value in importance.items():
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise ValueError(f"importance[{name!r}] = {value!r}: must be a finite number >= 0")
    if not (math.isfinite(value) and value >= 0):
      raise ValueError(f"importance[{name!r}] = {value!r}: must be a finite number >= 0")
    if name not in sizes:
      raise ValueError(f"layer {name!r} has an importance but no size; sizes has {list(sizes)}")
    size = sizes[name]
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
      raise ValueError(f"sizes[{name!r}] = {size!r}: must be a positive integer (weights)")
  if isinstance(budget_bits, bool) or not isinstance(budget_bits, numbers.Real):
    raise ValueError(f"budget_bits = {budget_bits!r}: must be a number of bits per weight")
  if not math.isfinite(budget_bits):
    raise ValueError(f"budget_bits = {budget_bits!r}: must be finite")
  exact = (
    Fraction(budget_bits)
    if isinstance(budget_bits, numbers.Rational)
    else Fraction(repr(float(budget_bits)))  # the decimal it prints as: 4.1 is 41/10
  )
  free = [name for name in importance if name not in fixed]
  return widths, fixed, free, exact


def allocate_bits(
  importance: Mapping[str, float],
  sizes: Mapping[str, int],
  candidates: Sequence[int],
  budget_bits: float,
  fixed: Mapping[str, int] | None = None,
) -> dict[str, int]:
  """Bit width per layer, in ``importance``'s order, greedy on gain per bit (module docstring).

  Args:
    importance: per layer, how much its quantization error matters in total (>= 0), e.g. its
      total coding length in bits, or the loss increase when it alone is quantized. Its keys
      are the layers, fixed ones included; their order breaks ties.
    sizes: per layer, its number of weights (entries for other layers are ignored).
    candidates: the allowed widths, integers in 2..16 (sorted and deduplicated here).
    budget_bits: the allowed average bits per weight over the free layers: they may use
      ``floor(budget_bits * sum of their sizes)`` bits, with a float ``budget_bits`` taken as the
      decimal it prints as (``4.1`` is ``41/10``, not the binary float just below it).
    fixed: layers that keep their width (2..16, a candidate or not), outside the budget.

  Raises:
    ValueError: for invalid inputs or a budget below the all-smallest-candidate model; the
      message starts with the quantity at fault (e.g. ``budget_bits = 1.5 ...``).
  """
  widths, fixed, free, exact_budget = _check_inputs(
    importance, sizes, candidates, budget_bits, fixed
  )
  total = sum(int(sizes[name]) for name in free)
  budget = math.floor(exact_budget * total)
  used = widths[0] * total
  if used > budget:
    raise ValueError(
      f"budget_bits = {budget_bits!r} is below the smallest candidate {widths[0]}: the"
      f" all-{widths[0]}-bit model already needs {used} bits for the {total} free weights"
      f" ({widths[0]} per weight), over the budget of {budget}"
    )
  level = dict.fromkeys(free, 0)  # index into widths
  weight = {name: Fraction(float(importance[name])) for name in free}

  def raise_of(order: int, name: str):
    """The heap entry of ``name``'s next raise (highest gain per bit first), or None."""
    i = level[name]
    if i + 1 == len(widths):
      return None
    b, nb = widths[i], widths[i + 1]
    cost = int(sizes[name]) * (nb - b)
    gain = weight[name] * (Fraction(1, 4**b) - Fraction(1, 4**nb))
    return (-gain / cost, order, name, cost)

  heap = [entry for order, name in enumerate(free) if (entry := raise_of(order, name))]
  heapq.heapify(heap)
  # A raise that does not fit now never will (used only grows): drop it, and with it the layer.
  while heap:
    _, order, name, cost = heapq.heappop(heap)
    if used + cost > budget:
      continue
    used += cost
    level[name] += 1
    if (entry := raise_of(order, name)) is not None:
      heapq.heappush(heap, entry)
  free_bits = {name: widths[level[name]] for name in free}
  return {name: fixed[name] if name in fixed else free_bits[name] for name in importance}


def memory_bits(bits: Mapping[str, int], sizes: Mapping[str, int]) -> int:
  """Weight memory in bits, ``sum(bits[l] * sizes[l])`` over the layers in ``bits``."""
  return sum(int(b) * int(sizes[name]) for name, b in bits.items())


def average_bits(bits: Mapping[str, int], sizes: Mapping[str, int]) -> float:
  """Bits per weight over the layers in ``bits`` (0 for none)."""
  total = sum(int(sizes[name]) for name in bits)
  return memory_bits(bits, sizes) / total if total else 0.0
