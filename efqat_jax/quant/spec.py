"""QuantSpec: the integer format a tensor is quantized to."""

from __future__ import annotations

import dataclasses
import numbers

GRANULARITIES = ("tensor", "channel", "group")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """An integer grid and how its scales are shared over a tensor.

  Attributes:
    bits: integer width, 2..16.
    signed: grid ``[-2^(b-1), 2^(b-1)-1]`` if True, else ``[0, 2^b-1]``.
    narrow: drop the most negative level of a signed grid, ``[-(2^(b-1)-1), 2^(b-1)-1]``.
    symmetric: zero point fixed at 0 if True; otherwise a (learnable) zero point is used.
    granularity: ``"tensor"`` (one scale), ``"channel"`` (one scale per index of ``axis``, which
      may be a tuple of axes) or ``"group"`` (one scale per ``group_size`` consecutive entries
      along ``axis`` and per index of every other axis).
    axis: the channel axis (or axes) for ``"channel"``; the grouped axis for ``"group"``.
    group_size: entries per group, only with ``"group"``.
    learnable: scale and zero point get LSQ gradients if True, zero gradients if False.

  Example:
    >>> QuantSpec.for_weights(4).qmin, QuantSpec.for_weights(4).qmax
    (-7, 7)
  """

  bits: int = 8
  signed: bool = True
  narrow: bool = False
  symmetric: bool = True
  granularity: str = "tensor"
  axis: int | tuple[int, ...] = -1
  group_size: int | None = None
  learnable: bool = True

  def __post_init__(self):
    bits = self.bits
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= 16:
      raise ValueError(f"QuantSpec.bits must be an integer in 2..16, got {bits!r}")
    object.__setattr__(self, "bits", int(bits))
    if self.granularity not in GRANULARITIES:
      raise ValueError(
        f"QuantSpec.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
      )
    if self.narrow and not self.signed:
      raise ValueError("QuantSpec.narrow=True needs signed=True (narrow drops the level -2^(b-1))")
    axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
    if not axes or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
      raise ValueError(
        f"QuantSpec.axis must be an int or a non-empty tuple of ints, got {self.axis!r}"
      )
    if self.granularity == "group":
      if not isinstance(self.axis, int):
        raise ValueError(
          f"QuantSpec.axis must be a single int with granularity='group', got {self.axis!r}"
        )
      if not isinstance(self.group_size, int) or self.group_size < 1:
        raise ValueError(
          f"QuantSpec.group_size must be a positive int with granularity='group', got {self.group_size!r}"
        )
    elif self.group_size is not None:
      raise ValueError(
        f"QuantSpec.group_size is only allowed with granularity='group', got group_size={self.group_size!r}"
        f" with granularity={self.granularity!r}"
      )

  @property
  def qmin(self) -> int:
    """Smallest integer level."""
    if not self.signed:
      return 0
    return -(2 ** (self.bits - 1)) + int(self.narrow)

  @property
  def qmax(self) -> int:
    """Largest integer level."""
    return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

  @classmethod
  def for_weights(cls, bits: int, **overrides) -> QuantSpec:
    """Signed, narrow, symmetric, per-output-channel: the usual weight format."""
    fields = dict(
      bits=bits, signed=True, narrow=True, symmetric=True, granularity="channel", axis=-1
    )
    return cls(**(fields | overrides))

  @classmethod
  def for_activations(cls, bits: int, **overrides) -> QuantSpec:
    """Unsigned, asymmetric, per-tensor: the usual activation format."""
    fields = dict(bits=bits, signed=False, symmetric=False, granularity="tensor")
    return cls(**(fields | overrides))
