"""Fake quantization with a straight-through estimator and LSQ gradients.

Forward: ``x_int = clip(round(x / s) + round(z), qmin, qmax)`` and ``x_hat = s * (x_int - round(z))``.
Backward (per element, ``u = x / s``, ``v = round(u) + round(z)``):

=============  ===========  =========================  ========
region          d x_hat/dx   d x_hat/ds                 d x_hat/dz
=============  ===========  =========================  ========
qmin<=v<=qmax   1            round(u) - u               0
v < qmin        0            qmin - round(z)            -s
v > qmax        0            qmax - round(z)            -s
=============  ===========  =========================  ========

The scale and zero-point gradients are summed over the entries that share them and multiplied by
LSQ's gradient scale ``1 / sqrt(n * qmax)`` (``n`` entries per scale) unless one is given.

A custom ``rounding`` (soft or stochastic rounding of weights, e.g. Attention Round) replaces
``round(u)`` in the forward pass. That path is plain JAX, differentiated by autodiff:
``x_hat = s * (clip(rounding(u) + round_ste(z), qmin, qmax) - round_ste(z))``, the clip passing
gradient 1 inside ``[qmin, qmax]`` (inclusive) and 0 outside, as in the table above. So
``d x_hat / dx = rounding'(u)`` inside, ``d x_hat / ds = rounding(u) - u * rounding'(u)`` inside
(``qmin - z`` / ``qmax - z`` at the clip), both scale and zero-point gradients multiplied by the
same gradient scale. With ``rounding=round_ste`` it computes the table above (the default path
keeps its ``custom_vjp``, which needs no autodiff through the rounding).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from efqat_jax.quant import granularity
from efqat_jax.quant.spec import QuantSpec


def lsq_grad_scale(spec: QuantSpec, elements_per_scale: int) -> float:
  """LSQ's gradient scale ``1 / sqrt(elements_per_scale * qmax)``."""
  return 1.0 / math.sqrt(max(1, elements_per_scale) * spec.qmax)


MIN_SCALE = 1e-12


def valid_scale(scale: jax.Array) -> jax.Array:
  """The scale a stored scale parameter stands for: ``max(|scale|, MIN_SCALE)``.

  Layers quantize with this, so that any optimizer step leaves a valid quantizer: a scale that
  an update pushed through zero acts as its magnitude (with its gradient mirrored), never as a
  negative or zero step size.
  """
  return jnp.maximum(jnp.abs(scale), jnp.asarray(MIN_SCALE, jnp.result_type(scale)))


def valid_zero_point(zero_point: jax.Array, spec: QuantSpec) -> jax.Array:
  """The zero point a stored one stands for: clipped into the grid ``[qmin, qmax]``."""
  return jnp.clip(zero_point, spec.qmin, spec.qmax)


def check_scale_values(scale: jax.Array) -> None:
  """Raises ValueError if a concrete (non-traced) scale has a non-finite or non-positive entry."""
  if isinstance(scale, jax.core.Tracer):
    return
  values = np.asarray(scale)
  if not np.all(np.isfinite(values)) or np.any(values <= 0):
    raise ValueError(
      f"scale must be finite and > 0 everywhere; got min={values.min()!r}, max={values.max()!r}"
    )


def check_zero_point_values(zero_point: jax.Array, spec: QuantSpec) -> None:
  """Raises ValueError if a concrete zero point lies outside the grid ``[qmin, qmax]``."""
  if isinstance(zero_point, jax.core.Tracer):
    return
  values = np.round(np.asarray(zero_point))
  if np.any(values < spec.qmin) or np.any(values > spec.qmax):
    raise ValueError(
      f"zero_point must lie in [qmin, qmax] = [{spec.qmin}, {spec.qmax}] so that 0 is on the grid;"
      f" got min={values.min()!r}, max={values.max()!r}"
    )


@jax.custom_jvp
def round_ste(u: jax.Array) -> jax.Array:
  """``jnp.round(u)`` (half to even) with the straight-through derivative 1."""
  return jnp.round(u)


round_ste.defjvps(lambda du, _, u: du)


Rounding = Callable[[jax.Array], jax.Array]


def fake_quant(
  x: jax.Array,
  scale: jax.Array,
  zero_point: jax.Array | None = None,
  *,
  spec: QuantSpec,
  grad_scale: float | None = None,
  rounding: Rounding | None = None,
) -> jax.Array:
  """Quantizes ``x`` onto the grid of ``spec`` and maps it back to floats.

  Args:
    x: array to quantize.
    scale: step size, of shape ``granularity.param_shape(spec, x.shape)``, positive.
    zero_point: integer-valued offset of the same shape (rounded in the forward pass); required
      when ``spec.symmetric`` is False, must be None otherwise.
    spec: the integer format.
    grad_scale: multiplier of the scale and zero-point gradients; LSQ's default if None.
    rounding: maps ``u = x / s`` (float32, the shape of ``x``) to grid values before the zero
      point is added (same shape; the result is clipped, so off-grid or out-of-range values are
      allowed); differentiated by autodiff. None: round to nearest with the STE (the default).

  Returns:
    The fake-quantized array, with the shape and dtype of ``x``.

  Example:
    >>> spec = QuantSpec(bits=4)
    >>> fake_quant(jnp.array([0.26, -3.0]), jnp.array(0.25), spec=spec)
    Array([ 0.25, -2.  ], dtype=float32)
  """
  granularity.check_param_shape("scale", scale, spec, x.shape)
  check_scale_values(scale)
  if spec.symmetric:
    if zero_point is not None:
      raise ValueError("zero_point must be None when spec.symmetric is True")
    zero_point = jnp.zeros_like(scale)
  elif zero_point is None:
    raise ValueError("zero_point is required when spec.symmetric is False")
  else:
    granularity.check_param_shape("zero_point", zero_point, spec, x.shape)
    check_zero_point_values(zero_point, spec)
  if grad_scale is None:
    grad_scale = lsq_grad_scale(spec, granularity.elements_per_param(spec, x.shape))
  if rounding is None:
    return _fake_quant(x, scale, zero_point, spec, float(grad_scale))
  return _fake_quant_rounded(x, scale, zero_point, spec, float(grad_scale), rounding)


def _grid(x, scale, zero_point, spec):
  """Blocked f32 view of x, broadcast scale and rounded zero point."""
  blocks = granularity.to_blocks(x, spec).astype(jnp.float32)
  return (blocks, *granularity.expand_scale_and_zero_point(scale, zero_point, spec, x.shape))


def _forward(x, scale, zero_point, spec):
  blocks, s, z = _grid(x, scale, zero_point, spec)
  q = jnp.clip(jnp.round(blocks / s) + z, spec.qmin, spec.qmax)
  return ((q - z) * s).reshape(x.shape).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fake_quant(x, scale, zero_point, spec, grad_scale):
  return _forward(x, scale, zero_point, spec)


def _fake_quant_fwd(x, scale, zero_point, spec, grad_scale):
  return _forward(x, scale, zero_point, spec), (x, scale, zero_point)


def _fake_quant_bwd(spec, grad_scale, residuals, g):
  x, scale, zero_point = residuals
  blocks, s, z = _grid(x, scale, zero_point, spec)
  g_blocks = granularity.to_blocks(g, spec).astype(jnp.float32)
  u = blocks / s
  r = jnp.round(u)
  below, above = r + z < spec.qmin, r + z > spec.qmax
  inside = ~(below | above)
  dx = jnp.where(inside, g_blocks, 0.0).reshape(x.shape).astype(x.dtype)
  if not spec.learnable:
    return dx, jnp.zeros_like(scale), jnp.zeros_like(zero_point)

  def reduce(t):
    return granularity.reduce_blocks(jnp.sum, t, spec, x.shape).reshape(jnp.shape(scale))

  ds_local = jnp.where(inside, r - u, jnp.where(below, spec.qmin - z, spec.qmax - z))
  ds = reduce(g_blocks * ds_local) * grad_scale
  if spec.symmetric:
    dz = jnp.zeros_like(zero_point)
  else:
    dz = reduce(jnp.where(inside, 0.0, -g_blocks * s)) * grad_scale
  return dx, ds.astype(scale.dtype), dz.astype(zero_point.dtype)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scale_grad(p: jax.Array, factor: float) -> jax.Array:
  """Identity whose gradient is multiplied by ``factor``."""
  return p


_scale_grad.defvjp(lambda p, factor: (p, None), lambda factor, _, g: (g * factor,))


def _fake_quant_rounded(x, scale, zero_point, spec, grad_scale, rounding):
  """``fake_quant`` with ``round`` replaced by ``rounding``, differentiated by autodiff."""
  if spec.learnable:
    scale, zero_point = _scale_grad(scale, grad_scale), _scale_grad(zero_point, grad_scale)
  else:
    scale, zero_point = jax.lax.stop_gradient(scale), jax.lax.stop_gradient(zero_point)
  blocks = granularity.to_blocks(x, spec).astype(jnp.float32)
  s = granularity.expand_param(scale, spec, x.shape).astype(jnp.float32)
  z = round_ste(granularity.expand_param(zero_point, spec, x.shape).astype(jnp.float32))
  u = (blocks / s).reshape(x.shape)
  r = jnp.asarray(rounding(u))
  if r.shape != x.shape:
    raise ValueError(f"rounding must keep the shape {x.shape} of its input, returned {r.shape}")
  v = r.reshape(blocks.shape).astype(jnp.float32) + z
  # Not jnp.clip: its gradient is 1/2 at the bounds, where rounded values land exactly.
  q = jnp.where(v < spec.qmin, float(spec.qmin), jnp.where(v > spec.qmax, float(spec.qmax), v))
  return ((q - z) * s).reshape(x.shape).astype(x.dtype)
