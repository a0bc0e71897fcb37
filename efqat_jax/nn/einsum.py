"""A two-operand einsum as one ``lax.dot_general`` and a transpose.

``nn.Einsum`` computes ``jnp.einsum(equation, inputs, kernel)``, which has no op to inject.
Written as one ``dot_general`` with the kernel as its right operand, it runs through the same
quantizing op as ``nn.Dense`` (fake-quantized kernel, channel-subset weight gradient, integer
export), and its output is transposed into the equation's layout afterwards.

Example:
  >>> plan = einsum_plan("btd,dhk->bthk", 3, 3)
  >>> y = jnp.transpose(lax.dot_general(x, kernel, plan.dimension_numbers), plan.output_perm)
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EinsumPlan:
  """``einsum(eq, x, w) == transpose(dot_general(x, w, dimension_numbers), output_perm)``."""

  dimension_numbers: tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], ...]]
  output_perm: tuple[int, ...]


def _expand_ellipsis(lhs: str, out: str, lhs_ndim: int) -> tuple[str, str]:
  """The input and output specs with the input's ``...`` (its leading or middle axes not named)
  replaced by letters of their own, in the output too."""
  if "..." not in lhs:
    return lhs, out
  named = len(lhs) - 3
  fresh = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in lhs + out]
  letters = "".join(fresh[: max(lhs_ndim - named, 0)])
  return lhs.replace("...", letters), out.replace("...", letters)


def _letters(spec: str, ndim: int, operand: str) -> str:
  if "." in spec:
    where = "the kernel" if operand == "kernel" else f"the {operand} without it in the input"
    raise ValueError(f"einsum {operand} spec {spec!r}: an ellipsis in {where} is not supported")
  if len(spec) != ndim:
    raise ValueError(f"einsum {operand} spec {spec!r} names {len(spec)} axes, the array has {ndim}")
  if len(set(spec)) != len(spec):
    raise ValueError(
      f"einsum {operand} spec {spec!r} repeats an axis (diagonals are not supported)"
    )
  return spec


def einsum_plan(equation: str, lhs_ndim: int, rhs_ndim: int) -> EinsumPlan:
  """Plans ``einsum(equation, lhs, rhs)`` as a dot_general of ``lhs`` with ``rhs``.

  Args:
    equation: explicit two-operand equation, e.g. ``"btd,dk->btk"`` or ``"...d,dk->...k"`` (an
      ellipsis in the input and the output, not the kernel; no repeated or summed-out axes:
      every axis of one operand is in the other operand or in the output).
    lhs_ndim: rank of the input.
    rhs_ndim: rank of the kernel.

  Returns:
    The EinsumPlan. Letters in both operands and the output are dot_general batch axes; letters
    in both operands only are contracted.
  """
  equation = equation.replace(" ", "")
  if "->" not in equation or equation.count(",") != 1:
    raise ValueError(f"einsum equation {equation!r} must be explicit ('ab,bc->ac') with 2 operands")
  inputs, out = equation.split("->")
  lhs_spec, rhs_spec = inputs.split(",")
  lhs_spec, out = _expand_ellipsis(lhs_spec, out, lhs_ndim)
  lhs = _letters(lhs_spec, lhs_ndim, "input")
  rhs = _letters(rhs_spec, rhs_ndim, "kernel")
  out = _letters(out, len(out), "output")
  for letter in lhs + rhs:
    in_other = letter in (rhs if letter in lhs else lhs)
    if not in_other and letter not in out:
      raise ValueError(
        f"einsum {equation!r}: axis {letter!r} is summed within one operand; not supported"
      )
  for letter in out:
    if letter not in lhs and letter not in rhs:
      raise ValueError(f"einsum {equation!r}: output axis {letter!r} is in no operand")
  batch = [c for c in lhs if c in rhs and c in out]
  contract = [c for c in lhs if c in rhs and c not in out]
  dims = (
    (tuple(lhs.index(c) for c in contract), tuple(rhs.index(c) for c in contract)),
    (tuple(lhs.index(c) for c in batch), tuple(rhs.index(c) for c in batch)),
  )
  produced = batch + [c for c in lhs if c not in rhs] + [c for c in rhs if c not in lhs]
  return EinsumPlan(dims, tuple(produced.index(c) for c in out))
