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
"""

from __future__ import annotations

import functools
import math

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


def fake_quant(
  x: jax.Array,
  scale: jax.Array,
  zero_point: jax.Array | None = None,
  *,
  spec: QuantSpec,
  grad_scale: float | None = None,
) -> jax.Array:
  """Quantizes ``x`` onto the grid of ``spec`` and maps it back to floats.

  Args:
    x: array to quantize.
    scale: step size, of shape ``granularity.param_shape(spec, x.shape)``, positive.
    zero_point: integer-valued offset of the same shape (rounded in the forward pass); required
      when ``spec.symmetric`` is False, must be None otherwise.
    spec: the integer format.
    grad_scale: multiplier of the scale and zero-point gradients; LSQ's default if None.

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
  return _fake_quant(x, scale, zero_point, spec, float(grad_scale))


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
