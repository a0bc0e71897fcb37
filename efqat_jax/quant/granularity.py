"""How a QuantSpec's scales map onto an array: shapes, broadcasting and reductions.

An array is viewed in "blocked" form: unchanged for ``tensor`` and ``channel`` granularity, and
with the grouped axis split into ``(n // group_size, group_size)`` for ``group``. A quantization
parameter (scale or zero point) has one entry per index of the blocked view's *kept* axes; its
natural shape keeps those axes in order (per-tensor: ``()``, per-channel over axis ``a``:
``(n_a,)``, per-group: the array's shape with the grouped axis divided by ``group_size``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from efqat_jax.quant.spec import QuantSpec


def normalize_axes(axis: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
  """Returns sorted non-negative axes, or raises ValueError naming ``axis``."""
  axes = axis if isinstance(axis, tuple) else (axis,)
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
        f"QuantSpec.axis={axis!r} is out of range for a {ndim}-d array: allowed {-ndim}..{ndim - 1}"
      )
  normalized = sorted({a % ndim for a in axes})
  if len(normalized) != len(axes):
    raise ValueError(f"QuantSpec.axis={axis!r} names the same axis twice")
  return tuple(normalized)


def _blocked_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
  if spec.granularity != "group":
    return tuple(shape)
  (a,) = normalize_axes(spec.axis, len(shape))
  if shape[a] % spec.group_size:
    raise ValueError(
      f"QuantSpec.group_size={spec.group_size} does not divide axis {a} of size {shape[a]}:"
      " allowed group sizes are its divisors"
    )
  return (*shape[:a], shape[a] // spec.group_size, spec.group_size, *shape[a + 1 :])


def _kept_axes(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Axes of the blocked view along which parameters differ."""
  if spec.granularity == "tensor":
    return ()
  if spec.granularity == "channel":
    return normalize_axes(spec.axis, len(shape))
  (a,) = normalize_axes(spec.axis, len(shape))
  return tuple(i for i in range(len(shape) + 1) if i != a + 1)


def param_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the scale (and zero point) for an array of ``shape``."""
  blocked = _blocked_shape(spec, shape)
  return tuple(blocked[i] for i in _kept_axes(spec, shape))


def elements_per_param(spec: QuantSpec, shape: tuple[int, ...]) -> int:
  """How many array entries share one scale."""
  return math.prod(shape) // max(1, math.prod(param_shape(spec, shape)))


def to_blocks(x: jax.Array, spec: QuantSpec) -> jax.Array:
  """The blocked view of ``x``."""
  return x.reshape(_blocked_shape(spec, x.shape))


def expand_param(p: jax.Array, spec: QuantSpec, shape: tuple[int, ...]) -> jax.Array:
  """Reshapes a parameter of natural shape so it broadcasts against the blocked view."""
  blocked, kept = _blocked_shape(spec, shape), _kept_axes(spec, shape)
  return jnp.reshape(p, [blocked[i] if i in kept else 1 for i in range(len(blocked))])


def expand_scale_and_zero_point(
  scale: jax.Array, zero_point: jax.Array | None, spec: QuantSpec, shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
  """Float32 scale and rounded zero point (0 if None), broadcastable to the blocked view."""
  s = expand_param(scale, spec, shape).astype(jnp.float32)
  if zero_point is None:
    return s, jnp.zeros((), jnp.float32)
  return s, jnp.round(expand_param(zero_point, spec, shape).astype(jnp.float32))


def reduce_blocks(
  fn: Callable[..., jax.Array], blocks: jax.Array, spec: QuantSpec, shape: tuple[int, ...]
) -> jax.Array:
  """Applies ``fn(blocks, axis=...)`` over the entries that share a parameter."""
  kept = _kept_axes(spec, shape)
  axes = tuple(i for i in range(blocks.ndim) if i not in kept)
  return fn(blocks, axis=axes) if axes else blocks


def check_param_shape(name: str, p: jax.Array, spec: QuantSpec, shape: tuple[int, ...]) -> None:
  """Raises ValueError if parameter ``name`` does not have the shape the spec needs."""
  expected = param_shape(spec, shape)
  if tuple(jnp.shape(p)) != expected and not (expected == () and jnp.size(p) == 1):
    raise ValueError(
      f"{name} has shape {tuple(jnp.shape(p))}, but granularity={spec.granularity!r} on an array"
      f" of shape {tuple(shape)} needs shape {expected}"
    )
