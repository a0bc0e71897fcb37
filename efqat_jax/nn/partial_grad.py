"""A linear op whose backward pass computes the weight gradient of a subset of output channels.

EfQAT trains a few output channels of a layer. The weight gradient of those channels is one op
on the output gradient's selected channels ``g[..., channels]`` instead of ``g``, so its cost
follows ``k = len(channels)``; the input gradient stays complete, so earlier layers still learn.
The frozen channels get a zero weight gradient.

Layout, chosen by measurement on XLA:CPU: the channels stay where they are. The backward
gathers ``g``'s selected channels and scatters the k-channel weight gradient into a zeroed
kernel. Laying the trainable channels out first (which needs a channel permutation through the
network) was no faster on ResNet-20, and for the Transformer's Dense kernels the scatter was
faster than expanding with a one-hot matmul or a gather (again on 2026-12-06: a gather that XLA
could fuse into the optimizer gave CWPL a 1.18x backward speedup against the scatter's 1.25x,
side by side, on a machine shared with another benchmark). So the network is never permuted.
The weight quantizer's backward runs on the whole kernel (its gradient is zero outside the
selected channels): differentiating it on the selected channels only, by gathering them from the
kernel before quantizing, made the d=128 Transformer's CWPL step slower on CPU (43.6 against
40.2 ms, side by side, 2026-12-06): the gather and its transpose on the kernel's minor axis cost
more than the few fused elementwise passes over the kernel they replace.

The weight gradient of the k channels is the op's own vjp on ``w``'s and ``g``'s selected
channels, except for a convolution given its ``ConvSettings``, which on CPU runs as one matmul
where that is cheaper (``efqat_jax.nn.conv_weight_grad`` has the layouts, the rule and the
measurements): XLA:CPU's filter-gradient convolution costs about a third of the full dW even
at k = 1, the matmul about a tenth.

What k channels cannot save: their matmul still reads the layer's whole input. Alone, for the
d=128 Transformer's second MLP Dense (2,016 tokens x 512 inputs, 128 outputs), 13 columns cost
0.16 of the full weight gradient and one column 0.08 (XLA:CPU, interleaved, beside another
benchmark, 2026-12-06).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from efqat_jax.nn.conv_weight_grad import LAYOUTS, ConvSettings, cpu_layout

LinearOp = Callable[..., jax.Array]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5, 6))
def channel_subset_grad(
  op: LinearOp,
  x: jax.Array,
  w: jax.Array,
  channels: jax.Array,
  num_out_axes: int = 1,
  depthwise: bool = False,
  conv: ConvSettings | None = None,
) -> jax.Array:
  """``op(x, w)``, differentiated w.r.t. ``w`` only for the output ``channels``.

  Args:
    op: a function linear in each argument whose output ends in ``w``'s trailing
      ``num_out_axes`` axes (Flax's Dense, DenseGeneral and Conv kernels), and that accepts a
      kernel whose output axes are merged into one of any size.
    x: input.
    w: kernel; its trailing ``num_out_axes`` axes are the output channels (flattened in C order).
    channels: int32[k], distinct output channels that get a weight gradient; entries equal to
      the number of channels C are padding (no channel), so that the layers of a stack, which
      share one program, can train different numbers of channels.
    num_out_axes: how many trailing axes of ``w`` are output channels (static).
    depthwise: ``op`` is a depthwise convolution (``feature_group_count`` = input channels =
      output channels), whose output channel c reads input channel c only.
    conv: ``op``'s settings if it is a convolution with one feature group
      (``conv_weight_grad.conv_settings(op)``, static): lets the backward pass compute the weight
      gradient as a matmul where that is cheaper. None: always the op's vjp.

  Returns:
    ``op(x, w)``.
  """
  return op(x, w)


def _fwd(op, x, w, channels, num_out_axes, depthwise, conv):
  return op(x, w), (x, w, channels)


def _bwd(op, num_out_axes, depthwise, conv, residuals, g):
  x, w, channels = residuals
  (dx,) = jax.vjp(lambda x_: op(x_, w), x)[1](g)
  if channels.shape[0] == 0:
    return dx, jnp.zeros_like(w), None
  size = math.prod(w.shape[w.ndim - num_out_axes :])
  take = functools.partial(jnp.take, indices=channels, axis=-1, mode="fill", fill_value=0)
  w_sel = take(w.reshape(*w.shape[: w.ndim - num_out_axes], size))
  g_sel = take(g.reshape(*g.shape[: g.ndim - num_out_axes], size))
  if depthwise:
    op = functools.partial(op, feature_group_count=channels.shape[0])
    x = take(x)
  dw_sel = _weight_grad(op, x, w_sel, g_sel, conv)
  dw = (
    jnp.zeros((*dw_sel.shape[:-1], size), dw_sel.dtype).at[..., channels].set(dw_sel, mode="drop")
  )
  return dx, dw.reshape(w.shape), None


def _weight_grad(op, x, w, g, conv: ConvSettings | None) -> jax.Array:
  """The gradient of ``sum(op(x, w) * g)`` w.r.t. ``w``: on CPU in the layout that
  ``conv_weight_grad.cpu_layout`` picks, elsewhere (and where it picks ``"vjp"``) the op's vjp."""
  vjp = lambda x_, g_: jax.vjp(lambda w_: op(x_, w_), w)[1](g_)[0]
  layout = "vjp" if conv is None else cpu_layout(x.shape, w.shape, conv)
  if layout == "vjp":
    return vjp(x, g)
  cpu = lambda x_, g_: LAYOUTS[layout](x_, g_, w.shape, conv).astype(w.dtype)
  return lax.platform_dependent(x, g, cpu=cpu, default=vjp)


channel_subset_grad.defvjp(_fwd, _bwd)
