"""The weight gradient of a convolution for k of its output channels, as one matmul.

``dW[tap, c, o] = sum over (n, p) of x[n, p, c] * g[n, p + pad - dilation * tap, o]`` (``p`` an
input position, ``g`` dilated by the stride). Two layouts, each one matmul over batch x positions:

* ``patch_matmul``: ``g``'s patches (``g`` shifted by each kernel tap: taps x k rows) times
  ``x`` as it is. The patches and the matmul follow k. (im2col of ``x`` instead builds taps x C
  columns whatever k is: 3-4x the full dW below, and a sum of per-tap matmuls of shifted ``x``
  1-2x; ``bench/conv_weight_grad.py`` times both.)
* ``pointwise_matmul`` (1x1 kernels): ``x`` at the positions the outputs read times ``g``.

Rule (``cpu_layout``), on XLA:CPU only: 1x1 kernels always take the pointwise matmul (XLA's
filter-gradient convolution is 2-10x slower for them even at k = C); other kernels take the
patch matmul while ``taps x k <= 1.5 C`` (C input channels; ``0.75 C`` at stride 2, where the
patches still span every input position), and the op's vjp above, whose cost has a floor of about
a third of the full dW. Other backends keep the vjp.

Share of the full dW's time (the vjp at k = C, in ms), vjp -> rule where the rule picks a matmul
(p: patch, 1: pointwise). Batch 64, SAME, medians of 30 interleaved rounds on a 2-core CPU,
jax 0.10.2, jemalloc (``bench/results/conv_weight_grad.json``):

  x, kernel/stride -> C out  full ms  k: share
  28x28x16 3x3/1 ->16         8.16    1: .32>.14p  2: .36>.20p  4: .33  8: .59
  14x14x32 3x3/1 ->32         4.15    1: .37>.10p  2: .31>.10p  4: .31>.18p  8: .35
  7x7x64 3x3/1 ->64           2.25    1: .35>.10p  2: .34>.10p  4: .33>.13p  8: .36>.25p  16: .42
  28x28x16 3x3/2 ->32         3.45    1: .54>.33p  2: .42  4: .42  8: .47
  28x28x16 1x1/2 ->32         1.73    1: .99>.16  2: .76>.21  8: .69>.23  32: 1>.28
  28x28x16 1x1/1 ->96        14.83    1: .13>.03  8: .16>.04  24: .50>.05  96: 1>.10
  14x14x144 1x1/1 ->24        5.04    1: .82>.10  4: .63>.11  8: .64>.13  24: 1>.18
  7x7x64 1x1/1 ->256          1.92    1: .28>.05  8: .19>.06  64: .48>.29  256: 1>.52
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# The patch matmul while taps x k <= PATCH_COLUMNS_PER_INPUT_CHANNEL x C / stride (measured).
PATCH_COLUMNS_PER_INPUT_CHANNEL = 1.5


@dataclasses.dataclass(frozen=True)
class ConvSettings:
  """The settings of a ``lax.conv_general_dilated`` with one feature and batch group and no input
  dilation, as it was called (hashable: a static argument)."""

  window_strides: tuple[int, ...]
  padding: str | tuple[tuple[int, int], ...]
  rhs_dilation: tuple[int, ...] | None = None
  dimension_numbers: Any = None
  precision: Any = None

  def numbers(self, x_shape, kernel_shape) -> lax.ConvDimensionNumbers:
    return lax.conv_dimension_numbers(x_shape, kernel_shape, self.dimension_numbers)


def conv_settings(op) -> ConvSettings | None:
  """The settings of ``op`` if it is ``functools.partial(lax.conv_general_dilated, **keywords)``
  with one feature and batch group and no input dilation, else None."""
  if not (isinstance(op, functools.partial) and op.func is lax.conv_general_dilated):
    return None
  kw = op.keywords
  if op.args or "window_strides" not in kw or "padding" not in kw:
    return None
  if kw.get("feature_group_count", 1) != 1 or kw.get("batch_group_count", 1) != 1:
    return None
  if any(d != 1 for d in kw.get("lhs_dilation") or ()):
    return None
  padding = kw["padding"]
  return ConvSettings(
    window_strides=tuple(kw["window_strides"]),
    padding=padding if isinstance(padding, str) else tuple(tuple(p) for p in padding),
    rhs_dilation=None if kw.get("rhs_dilation") is None else tuple(kw["rhs_dilation"]),
    dimension_numbers=kw.get("dimension_numbers"),
    precision=kw.get("precision"),
  )


def cpu_layout(x_shape, kernel_shape, conv: ConvSettings) -> str:
  """The fastest weight-gradient layout on XLA:CPU (measured, see the module docstring) for a
  kernel of ``kernel_shape`` (k output channels): a key of ``LAYOUTS``, or ``"vjp"``."""
  dn = conv.numbers(x_shape, kernel_shape)
  taps = math.prod(kernel_shape[d] for d in dn.rhs_spec[2:])
  k, c = kernel_shape[dn.rhs_spec[0]], x_shape[dn.lhs_spec[1]]
  if taps == 1:
    return "pointwise_matmul"
  # A stride s leaves the vjp 1/s^2 of the positions and the patches all of them.
  limit = PATCH_COLUMNS_PER_INPUT_CHANNEL * c / max(conv.window_strides)
  return "patch_matmul" if taps * k <= limit else "vjp"


def _padding(x_spatial, window, conv: ConvSettings) -> list[tuple[int, int]]:
  if not isinstance(conv.padding, str):
    return list(conv.padding)
  dilated = [(w - 1) * r + 1 for w, r in zip(window, _dilation(window, conv), strict=True)]
  return lax.padtype_to_pads(x_spatial, dilated, conv.window_strides, conv.padding)


def _dilation(window, conv: ConvSettings) -> tuple[int, ...]:
  return conv.rhs_dilation or (1,) * len(window)


def _channels_last(a: jax.Array, spec) -> jax.Array:
  """``a`` as ``[n, *spatial, c]``, from a conv operand laid out by ``spec`` (batch, feature,
  spatial dims)."""
  return jnp.transpose(a, (spec[0], *spec[2:], spec[1]))


def _kernel_layout(dw: jax.Array, rhs_spec) -> jax.Array:
  """``dw`` from ``[*window, c, o]`` to the kernel's layout (``rhs_spec``: out, in, spatial)."""
  layout = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
  return jnp.transpose(dw, tuple(layout.index(d) for d in range(len(layout))))


def _left_transposed_matmul(rows_t: jax.Array, x: jax.Array, window, precision) -> jax.Array:
  """``[*window, c, o]`` from ``rows_t [window x o, rows] @ x [rows, c]``.

  The matmul keeps this form (the narrow operand transposed on the left, the result transposed
  afterwards): on XLA:CPU it is then a plain (YNNPACK) matmul, while the same product written
  as ``x^T @ rows`` transposes ``x`` or runs a slower kernel (measured: 3-10x at k <= 8)."""
  dw = jnp.matmul(rows_t, x, precision=precision)
  return jnp.swapaxes(dw.reshape(*window, -1, x.shape[-1]), -1, -2)


def pointwise_weight_grad(
  x: jax.Array, g: jax.Array, kernel_shape, conv: ConvSettings
) -> jax.Array:
  """The weight gradient of a one-tap (1x1) kernel of ``kernel_shape``: the input at the
  positions the outputs read, times the output gradient ``g``, one matmul."""
  dn = conv.numbers(x.shape, kernel_shape)
  x, g = _channels_last(x, dn.lhs_spec), _channels_last(g, dn.out_spec)
  pads = _padding(x.shape[1:-1], (1,) * (x.ndim - 2), conv)
  x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)])
  reach = [s * (q - 1) + 1 for s, q in zip(conv.window_strides, g.shape[1:-1], strict=True)]
  x = lax.slice(x, (0,) * x.ndim, (x.shape[0], *reach, x.shape[-1]), (1, *conv.window_strides, 1))
  (c, k), window = (x.shape[-1], g.shape[-1]), (1,) * (x.ndim - 2)
  x = x.reshape(-1, c)
  if k < c:  # g is the narrow operand
    g_t = jnp.moveaxis(g, -1, 0).reshape(k, -1)
    return _kernel_layout(_left_transposed_matmul(g_t, x, window, conv.precision), dn.rhs_spec)
  dims = (((0,), (0,)), ((), ()))  # measured fastest at k >= c
  dw = lax.dot_general(x, g.reshape(-1, k), dims, precision=conv.precision)  # [c, o]
  return _kernel_layout(dw.reshape(*window, c, k), dn.rhs_spec)


def g_patches(g: jax.Array, x_spatial, window, conv: ConvSettings) -> jax.Array:
  """``[tap, o, n, *p]``: ``g[o, n, *q]`` (channels first) at ``q = p + pad - dilation * tap``
  on the stride-dilated output grid, zero off it, for every input position ``p``."""
  zero = jnp.zeros((), g.dtype)
  strides, dilation = conv.window_strides, _dilation(window, conv)
  pads = _padding(x_spatial, window, conv)
  spatial = zip(x_spatial, g.shape[2:], window, strides, dilation, pads, strict=True)
  config = [(0, 0, 0)] * 2
  for size, out, w, s, r, (lo, _) in spatial:
    reach = r * (w - 1)  # g_pad[t] = g_dilated[t + lo - reach]
    config.append((reach - lo, size + lo - (s * (out - 1) + 1), s - 1))
  g_pad = lax.pad(g, zero, config)
  taps = itertools.product(*(range(w) for w in window))
  return jnp.stack([_tap_slice(g_pad, tap, window, dilation, x_spatial) for tap in taps])


def _tap_slice(g_pad, tap, window, dilation, x_spatial) -> jax.Array:
  """``g_pad[:, :, *(p + dilation * (window - 1 - tap))]`` for the input positions ``p``."""
  starts = [r * (w - 1 - i) for i, w, r in zip(tap, window, dilation, strict=True)]
  limits = [start + size for start, size in zip(starts, x_spatial, strict=True)]
  return lax.slice(g_pad, (0, 0, *starts), (*g_pad.shape[:2], *limits))


def patch_matmul_weight_grad(
  x: jax.Array, g: jax.Array, kernel_shape, conv: ConvSettings
) -> jax.Array:
  """The weight gradient of a kernel of ``kernel_shape`` given the output gradient ``g``, as
  ``g_patches(g)^T @ x``: one matmul over batch x input positions."""
  dn = conv.numbers(x.shape, kernel_shape)
  x = _channels_last(x, dn.lhs_spec)  # n, *p, c
  g = jnp.transpose(g, (dn.out_spec[1], dn.out_spec[0], *dn.out_spec[2:]))  # o, n, *q
  window = tuple(kernel_shape[d] for d in dn.rhs_spec[2:])
  patches = g_patches(g, x.shape[1:-1], window, conv)
  rows = math.prod(x.shape[:-1])
  x, patches = x.reshape(rows, x.shape[-1]), patches.reshape(-1, rows)
  return _kernel_layout(_left_transposed_matmul(patches, x, window, conv.precision), dn.rhs_spec)


# name: (x, g, kernel_shape, conv) -> the weight gradient, laid out as the kernel.
LAYOUTS = {"pointwise_matmul": pointwise_weight_grad, "patch_matmul": patch_matmul_weight_grad}
