"""Range estimators: from data to a clipping range ``(lo, hi)``, and from a range to scale and zero point.

Every estimator returns ``lo`` and ``hi`` with the parameter shape of the spec's granularity
(``granularity.param_shape``), so per-channel and per-group ranges come out directly.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from efqat_jax.quant import granularity
from efqat_jax.quant.fake_quant import fake_quant
from efqat_jax.quant.spec import QuantSpec

_TINY = 1e-12


def _reduce(fn, x: jax.Array, spec: QuantSpec) -> jax.Array:
  blocks = granularity.to_blocks(x, spec).astype(jnp.float32)
  return granularity.reduce_blocks(fn, blocks, spec, x.shape)


def minmax(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
  """Smallest and largest value per scale group."""
  return _reduce(jnp.min, x, spec), _reduce(jnp.max, x, spec)


def percentile(x: jax.Array, spec: QuantSpec, q: float = 99.99) -> tuple[jax.Array, jax.Array]:
  """The ``100 - q`` and ``q`` percentiles per scale group (robust to outliers)."""
  if not 50.0 < q <= 100.0:
    raise ValueError(f"percentile q must be in (50, 100], got {q!r}")
  lo = _reduce(lambda t, axis: jnp.percentile(t, 100.0 - q, axis=axis), x, spec)
  hi = _reduce(lambda t, axis: jnp.percentile(t, q, axis=axis), x, spec)
  return lo, hi


def scale_and_zero_point(
  lo: jax.Array, hi: jax.Array, spec: QuantSpec
) -> tuple[jax.Array, jax.Array | None]:
  """Scale (and zero point, None if symmetric) whose grid covers ``[lo, hi]``.

  The range is first widened to contain 0, so that 0 is exactly representable. A degenerate
  range (all zeros) gets scale 1.
  """
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  if spec.symmetric:
    extent = jnp.maximum(-lo, hi) if spec.signed else hi
    scale = extent / spec.qmax
    return jnp.where(scale > _TINY, scale, 1.0), None
  scale = (hi - lo) / (spec.qmax - spec.qmin)
  scale = jnp.where(scale > _TINY, scale, 1.0)
  zero_point = jnp.clip(jnp.round(spec.qmin - lo / scale), spec.qmin, spec.qmax)
  return scale, zero_point


def mse(
  x: jax.Array, spec: QuantSpec, num_candidates: int = 100, min_ratio: float = 0.2
) -> tuple[jax.Array, jax.Array]:
  """The min-max range shrunk by the ratio in ``[min_ratio, 1]`` that minimises the squared
  quantization error, chosen separately for every scale group.
  """
  if num_candidates < 1 or not 0.0 < min_ratio <= 1.0:
    raise ValueError(
      f"mse needs num_candidates >= 1 and 0 < min_ratio <= 1, got {num_candidates}, {min_ratio}"
    )
  lo, hi = minmax(x, spec)

  def error(ratio):
    scale, zero_point = scale_and_zero_point(lo * ratio, hi * ratio, spec)
    x32 = x.astype(jnp.float32)
    err = (fake_quant(x32, scale, zero_point, spec=spec) - x32) ** 2
    return _reduce(jnp.sum, err, spec)

  def step(best, ratio):
    best_err, best_ratio = best
    err = error(ratio)
    better = err < best_err
    return (jnp.where(better, err, best_err), jnp.where(better, ratio, best_ratio)), None

  ratios = jnp.linspace(1.0, min_ratio, num_candidates)
  init = (error(ratios[0]), jnp.ones_like(lo))
  (_, best_ratio), _ = jax.lax.scan(step, init, ratios[1:])
  return lo * best_ratio, hi * best_ratio


class EmaRange(NamedTuple):
  """Running range of activations: exponential moving average of per-batch min and max."""

  lo: jax.Array
  hi: jax.Array
  count: jax.Array


def ema_init(shape: tuple[int, ...] = ()) -> EmaRange:
  """An empty running range (``count == 0``)."""
  return EmaRange(jnp.zeros(shape), jnp.zeros(shape), jnp.zeros((), jnp.int32))


def ema_update(state: EmaRange, x: jax.Array, spec: QuantSpec, momentum: float = 0.9) -> EmaRange:
  """Folds the min and max of batch ``x`` into the running range; the first batch sets it."""
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
  lo, hi = minmax(x, spec)
  first = state.count == 0
  return EmaRange(
    jnp.where(first, lo, momentum * state.lo + (1 - momentum) * lo),
    jnp.where(first, hi, momentum * state.hi + (1 - momentum) * hi),
    state.count + 1,
  )
