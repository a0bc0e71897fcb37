"""Integer export and the integer reference path (int32 accumulation).

The hardware model: integer inputs ``x_int`` (with zero point ``z``) times integer weights
``w_int`` are summed in an int32 accumulator, ``acc = sum x_int * w_int``; the output is
``s_x * s_w * (acc - z * sum w_int) + bias``. That equals the fake-quantized layer up to float
rounding. The largest ``|acc|`` is reported, for accumulator-aware work: it is the magnitude an
accumulator must hold when inputs enter unshifted (unsigned inputs for asymmetric activations).
The proof that no partial sum can leave a P-bit accumulator is ``efqat_jax.quant.overflow``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from efqat_jax.quant import accumulator as accum
from efqat_jax.quant import granularity
from efqat_jax.quant.accumulator import AccumulatorSpec
from efqat_jax.quant.rows import kernel_axes
from efqat_jax.quant.spec import QuantSpec


def int_dtype(spec: QuantSpec) -> np.dtype:
  """The narrowest numpy integer type that holds the grid of ``spec``."""
  if spec.bits <= 8:
    return np.dtype(np.int8 if spec.signed else np.uint8)
  return np.dtype(np.int16 if spec.signed else np.uint16)


def quantize_to_int(
  x: jax.Array, scale: jax.Array, zero_point: jax.Array | None, spec: QuantSpec
) -> jax.Array:
  """``clip(round(x / s) + round(z), qmin, qmax)`` as an integer array (see ``int_dtype``)."""
  blocks = granularity.to_blocks(x, spec).astype(jnp.float32)
  s, z = granularity.expand_scale_and_zero_point(scale, zero_point, spec, x.shape)
  q = jnp.clip(jnp.round(blocks / s) + z, spec.qmin, spec.qmax)
  return q.reshape(x.shape).astype(int_dtype(spec))


def dequantize(
  q: jax.Array, scale: jax.Array, zero_point: jax.Array | None, spec: QuantSpec
) -> jax.Array:
  """``s * (q - z)`` in float32."""
  blocks = granularity.to_blocks(q, spec).astype(jnp.float32)
  s, z = granularity.expand_scale_and_zero_point(scale, zero_point, spec, q.shape)
  return ((blocks - z) * s).reshape(q.shape)


OPS = ("dot_general", "conv", "take")


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["weight", "weight_scale", "input_scale", "input_zero_point", "bias"],
  meta_fields=[
    "weight_spec",
    "input_spec",
    "op",
    "dimension_numbers",
    "window_strides",
    "padding",
    "rhs_dilation",
    "feature_group_count",
  ],
)
@dataclasses.dataclass(frozen=True)
class IntegerLayer:
  """One exported layer: integer weights, scales, zero point and the op that uses them.

  Attributes:
    weight: integer kernel (``int_dtype(weight_spec)``).
    weight_scale: float scales, ``granularity.param_shape(weight_spec, weight.shape)``.
    input_scale: float scale of the input quantizer (None for a weight-only layer).
    input_zero_point: integer zero point of the input (None if symmetric or weight-only).
    bias: float bias added after rescaling, or None.
    weight_spec, input_spec: the integer formats (input_spec None: weight-only).
    op: ``"dot_general"``, ``"conv"`` or ``"take"`` (an embedding lookup: rows of the
      dequantized table, no accumulation).
    dimension_numbers: of ``lax.dot_general`` or ``lax.conv_general_dilated``.
    window_strides, padding, rhs_dilation, feature_group_count: the convolution's settings.

  ``formats()`` gives the widths and signedness the integers are stored with (a 4-bit weight
  sits in int8); ``integer_layer_arrays`` flattens a layer for saving.
  """

  weight: jax.Array
  weight_scale: jax.Array
  input_scale: jax.Array | None
  input_zero_point: jax.Array | None
  bias: jax.Array | None
  weight_spec: QuantSpec
  input_spec: QuantSpec | None
  op: str
  dimension_numbers: Any
  window_strides: tuple[int, ...] = ()
  padding: str | tuple[tuple[int, int], ...] = ()
  rhs_dilation: tuple[int, ...] = ()
  feature_group_count: int = 1

  def __post_init__(self):
    if self.op not in OPS:
      raise ValueError(f"IntegerLayer.op must be one of {OPS}, got {self.op!r}")
    if not self.weight_spec.symmetric:
      raise ValueError(
        "IntegerLayer.weight_spec must be symmetric: kernel zero points are not supported"
      )
    if self.op == "conv":
      n_spatial = len(self.dimension_numbers.lhs_spec) - 2
      if len(self.window_strides) != n_spatial or len(self.rhs_dilation) != n_spatial:
        raise ValueError(
          f"a conv IntegerLayer needs window_strides and rhs_dilation with {n_spatial} entries,"
          f" got {self.window_strides!r} and {self.rhs_dilation!r}"
        )
    if self.input_spec is not None and self.input_spec.granularity != "tensor":
      raise ValueError(
        "the integer path needs a per-tensor input scale (it factors out of the sum);"
        f" got input_spec.granularity={self.input_spec.granularity!r}"
      )

  @property
  def accumulates(self) -> bool:
    """Whether integer inputs are summed in an accumulator (not a lookup or weight-only)."""
    return self.op != "take" and self.input_spec is not None

  def formats(self) -> dict[str, int]:
    """The integer formats as plain numbers: ``weight_bits``, ``weight_signed``,
    ``weight_narrow`` and, for a layer with quantized inputs, the same three of ``input``
    (booleans as 0 / 1)."""
    specs = {"weight": self.weight_spec, "input": self.input_spec}
    return {
      f"{name}_{field}": int(getattr(spec, field))
      for name, spec in specs.items()
      if spec is not None
      for field in ("bits", "signed", "narrow")
    }


ARRAY_FIELDS = ("weight", "weight_scale", "input_scale", "input_zero_point", "bias")


def integer_layer_arrays(
  layer: IntegerLayer, accumulator: AccumulatorSpec | None = None
) -> dict[str, np.ndarray]:
  """One exported layer as flat numpy arrays, e.g. for ``np.savez``: enough to run it and to
  re-check its accumulator promise without the model (``efqat_jax.quant.export_check``).

  Args:
    layer: the exported layer.
    accumulator: the accumulator its integer weights were made to fit (AXE), or None.

  Returns:
    ``weight``, ``weight_scale`` and, where the layer has them, ``input_scale``,
    ``input_zero_point`` and ``bias``; ``layer.formats()`` as 0-d int32 arrays; ``op`` (a 0-d
    string), ``kernel_output_axes`` and ``kernel_input_axes`` (int32: the weight's axes that
    index output channels, and those summed over in the op's order, a convolution's input
    channel first; absent for a kernel with batch axes). A layer with integer inputs adds ``input_min`` and ``input_max``, the
    integer input range an accumulator proof assumes (the full grid of the input format; an
    input's zero point is subtracted outside the accumulator). With ``accumulator``:
    ``accumulator_bits``, ``accumulator_tile`` (inputs per accumulator, the whole row without
    tiles) and ``accumulation_order`` (a 0-d string, ``AccumulatorSpec.order``).

  Example:
    >>> arrays = integer_layer_arrays(export_integer(qmodel, variables, x)["Conv_0"])
    >>> int(arrays["weight_bits"]), arrays["weight"].dtype
    (4, dtype('int8'))
  """
  arrays = {
    name: np.asarray(getattr(layer, name))
    for name in ARRAY_FIELDS
    if getattr(layer, name) is not None
  }
  arrays |= {name: np.asarray(v, np.int32) for name, v in layer.formats().items()}
  arrays["op"] = np.asarray(layer.op)
  if layer.input_spec is not None:
    mu, nu = accum.input_range(layer.input_spec)
    arrays["input_min"], arrays["input_max"] = np.asarray(mu, np.int64), np.asarray(nu, np.int64)
  try:
    out_axes, in_axes = kernel_axes(layer.op, layer.dimension_numbers, np.ndim(layer.weight))
  except ValueError:  # kernel batch axes: one matrix per batch entry, no rows (and no AXE)
    return arrays
  arrays["kernel_output_axes"] = np.asarray(out_axes, np.int32)
  arrays["kernel_input_axes"] = np.asarray(in_axes, np.int32)
  if accumulator is not None:
    k = math.prod(np.shape(layer.weight)[a] for a in in_axes)
    arrays["accumulator_bits"] = np.asarray(accumulator.bits, np.int32)
    arrays["accumulator_tile"] = np.asarray(accumulator.tile_size(k), np.int64)
    arrays["accumulation_order"] = np.asarray(accumulator.order)
  return arrays


def export_layer(
  kernel: jax.Array,
  kernel_scale: jax.Array,
  weight_spec: QuantSpec,
  input_scale: jax.Array | None,
  input_zero_point: jax.Array | None,
  input_spec: QuantSpec | None,
  bias: jax.Array | None = None,
  **op_settings: Any,
) -> IntegerLayer:
  """Rounds a float kernel to integers and packs it with its scales into an IntegerLayer."""
  zero_point = None if input_zero_point is None else jnp.round(input_zero_point).astype(jnp.int32)
  return IntegerLayer(
    weight=quantize_to_int(kernel, kernel_scale, None, weight_spec),
    weight_scale=jnp.asarray(kernel_scale, jnp.float32),
    input_scale=None if input_scale is None else jnp.asarray(input_scale, jnp.float32),
    input_zero_point=zero_point,
    bias=bias,
    weight_spec=weight_spec,
    input_spec=input_spec,
    **op_settings,
  )


def apply_integer(layer: IntegerLayer, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Runs the layer with integer inputs, integer weights and int32 accumulation.

  Args:
    layer: an exported layer.
    x: float input, as the fake-quantized layer receives it (integer ids for ``take``).

  Returns:
    ``(y, max_abs_accumulator)``: the float output (with bias) and the largest ``|acc|``
    (0 for a weight-only layer, whose inputs are not integers).
  """
  if layer.op == "conv":
    y, acc_max = _conv(layer, x)
  elif layer.op == "take":
    table = dequantize(layer.weight, layer.weight_scale, None, layer.weight_spec)
    y, acc_max = jnp.take(table, x, axis=0), jnp.zeros((), jnp.int32)
  else:
    y, acc_max = _dot_general(layer, x)
  if layer.bias is not None:
    y = y + layer.bias
  return y, acc_max


def _integer_input(layer: IntegerLayer, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Integer input as int32 and its zero point as an int32 scalar."""
  zp = layer.input_zero_point
  q = quantize_to_int(x, layer.input_scale, zp, layer.input_spec).astype(jnp.int32)
  return q, jnp.zeros((), jnp.int32) if zp is None else jnp.reshape(zp, ()).astype(jnp.int32)


def _accumulate(op, xq, zero_point, w):
  """``(acc, acc - z * sum w)`` for an integer op: the raw accumulator and the centred sum."""
  acc = op(xq, w)
  offset = op(jnp.full_like(xq, zero_point), w)
  return acc, acc - offset


def _weight_scale_for_output(layer: IntegerLayer, out_shape, out_axis_of_rhs: dict[int, int]):
  """Reshapes per-channel weight scales to broadcast over the output; raises if they cannot."""
  spec, w = layer.weight_spec, layer.weight
  if spec.granularity == "tensor":
    return jnp.reshape(layer.weight_scale, ())
  kept = granularity.normalize_axes(spec.axis, w.ndim)
  if not set(kept) <= set(out_axis_of_rhs):
    raise ValueError(
      f"the integer path needs weight scales per output channel; axis={spec.axis!r} includes a"
      " reduced (input) axis of the kernel"
    )
  shape = [1] * len(out_shape)
  for rhs_axis in kept:
    shape[out_axis_of_rhs[rhs_axis]] = w.shape[rhs_axis]
  return jnp.reshape(layer.weight_scale, shape)


def _dot_general(layer: IntegerLayer, x: jax.Array):
  (lc, rc), (lb, rb) = layer.dimension_numbers
  w = layer.weight.astype(jnp.int32)
  if layer.weight_spec.granularity == "group":
    return _grouped_dot(layer, x)
  rhs_free = [d for d in range(w.ndim) if d not in rc and d not in rb]
  n_lhs_free = x.ndim - len(lc) - len(lb)
  out_axis_of_rhs = {d: len(lb) + n_lhs_free + i for i, d in enumerate(rhs_free)}
  dims = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
  if layer.input_spec is None:
    w_float = dequantize(w, layer.weight_scale, None, layer.weight_spec)
    return lax.dot_general(x, w_float, dims), jnp.zeros((), jnp.int32)
  op = functools.partial(lax.dot_general, dimension_numbers=dims, preferred_element_type=jnp.int32)
  xq, z = _integer_input(layer, x)
  acc, centred = _accumulate(op, xq, z, w)
  w_scale = _weight_scale_for_output(layer, centred.shape, out_axis_of_rhs)
  y = centred.astype(jnp.float32) * layer.input_scale * w_scale
  return y, jnp.max(jnp.abs(acc))


def _grouped_dot(layer: IntegerLayer, x: jax.Array):
  """Group-wise weights: one int32 accumulator per group (multi-stage accumulation)."""
  (lc, rc), (lb, rb) = layer.dimension_numbers
  spec, w = layer.weight_spec, layer.weight.astype(jnp.int32)
  (a,) = granularity.normalize_axes(spec.axis, w.ndim)
  if tuple(rc) != (a,) or lb or rb or layer.input_spec is None:
    raise ValueError(
      "group-wise weights in the integer path need the grouped axis to be the only contracted"
      f" kernel axis, no batch axes and quantized inputs; got contracting={rc}, axis={a}"
    )
  g, lhs_axis = spec.group_size, lc[0]
  xq, z = _integer_input(layer, x)
  xq = xq.reshape(*xq.shape[:lhs_axis], -1, g, *xq.shape[lhs_axis + 1 :])
  wb = w.reshape(*w.shape[:a], -1, g, *w.shape[a + 1 :])
  dims = (((lhs_axis + 1,), (a + 1,)), ((lhs_axis,), (a,)))
  op = functools.partial(lax.dot_general, dimension_numbers=dims, preferred_element_type=jnp.int32)
  acc, centred = _accumulate(op, xq, z, wb)  # (groups, lhs free..., rhs free...)
  scale = jnp.moveaxis(layer.weight_scale, a, 0)
  scale = scale.reshape(scale.shape[0], *([1] * (x.ndim - 1)), *scale.shape[1:])
  y = jnp.sum(centred.astype(jnp.float32) * scale, axis=0) * layer.input_scale
  return y, jnp.max(jnp.abs(acc))


def _conv(layer: IntegerLayer, x: jax.Array):
  dn = layer.dimension_numbers
  w = layer.weight.astype(jnp.int32)
  if layer.weight_spec.granularity == "group":
    raise ValueError("the integer conv path supports per-tensor and per-channel weights, not group")
  spatial = dn.lhs_spec[2:]
  window = [
    (w.shape[d] - 1) * r + 1 for d, r in zip(dn.rhs_spec[2:], layer.rhs_dilation, strict=True)
  ]
  padding = layer.padding
  if isinstance(padding, str):
    in_spatial = [x.shape[d] for d in spatial]
    padding = lax.padtype_to_pads(in_spatial, window, layer.window_strides, padding)
  op = functools.partial(
    lax.conv_general_dilated,
    window_strides=layer.window_strides,
    padding="VALID",
    rhs_dilation=layer.rhs_dilation,
    dimension_numbers=dn,
    feature_group_count=layer.feature_group_count,
    preferred_element_type=jnp.int32,
  )
  pads = [(0, 0)] * x.ndim
  for d, p in zip(spatial, padding, strict=True):
    pads[d] = tuple(p)
  if layer.input_spec is None:
    w_float = dequantize(w, layer.weight_scale, None, layer.weight_spec)
    y = lax.conv_general_dilated(
      jnp.pad(x, pads), w_float, layer.window_strides, "VALID",
      rhs_dilation=layer.rhs_dilation, dimension_numbers=dn,
      feature_group_count=layer.feature_group_count,
    )  # fmt: skip
    return y, jnp.zeros((), jnp.int32)
  xq, z = _integer_input(layer, x)
  # Zero padding of the float input is padding with the zero point in the integer domain.
  xq = jnp.pad(xq, pads, constant_values=z)
  acc, centred = _accumulate(op, xq, z, w)
  w_scale = _weight_scale_for_output(layer, centred.shape, {dn.rhs_spec[0]: dn.out_spec[1]})
  y = centred.astype(jnp.float32) * layer.input_scale * w_scale
  return y, jnp.max(jnp.abs(acc))
