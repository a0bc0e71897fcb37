"""A linear op whose backward pass computes the weight gradient of its first k output channels only.

EfQAT trains a few output channels of a layer. With the trainable channels laid out first
(the last kernel axis is the output-channel axis, as in Flax's Dense and Conv kernels), the
weight gradient is one op on ``g[..., :k]`` instead of ``g``: its cost follows ``k``. The input
gradient stays complete, so earlier layers still learn. The frozen channels' weight gradient is
zero (padding that XLA folds into whatever consumes it).

``research/platform.md`` section 3 measured the alternatives on XLA:CPU: gathering arbitrary
channels (and scattering back) can cost more than the full gradient, while contiguous leading
channels did best; hence this op takes a static ``k`` and leaves the channel order to the caller.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

LinearOp = Callable[[jax.Array, jax.Array], jax.Array]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def leading_channels_grad(op: LinearOp, x: jax.Array, w: jax.Array, k: int) -> jax.Array:
  """``op(x, w)``, differentiated w.r.t. ``w`` only for output channels ``[:k]``.

  Args:
    op: a function linear in each argument, whose output's last axis is ``w``'s last axis
      (e.g. ``lambda x, w: x @ w`` or a NHWC/HWIO convolution).
    x: input.
    w: kernel; its last axis holds the output channels.
    k: how many leading output channels get a weight gradient (static, 0..C).

  Returns:
    ``op(x, w)``.
  """
  return op(x, w)


def _fwd(op, x, w, k):
  if not 0 <= k <= w.shape[-1]:
    raise ValueError(f"k must be in 0..{w.shape[-1]} (the output channels), got {k}")
  return op(x, w), (x, w)


def _bwd(op, k, residuals, g):
  x, w = residuals
  (dx,) = jax.vjp(lambda x_: op(x_, w), x)[1](g)
  if k == 0:
    return dx, jnp.zeros_like(w)
  (dw,) = jax.vjp(lambda w_: op(x, w_), w[..., :k])[1](g[..., :k])
  return dx, jnp.pad(dw, [(0, 0)] * (w.ndim - 1) + [(0, w.shape[-1] - k)])


leading_channels_grad.defvjp(_fwd, _bwd)
