"""The layer-wise PTQ methods ``optq``, ``gpfq``, ``axe_optq`` and ``axe_gpfq``, registered.

Each takes one layer's kernel as rows (``efqat_jax.quant.rows``: one row per output channel), one
matrix per group of a grouped convolution, and the statistics captured for that layer
(``efqat_jax.ptq.capture``): ``h`` (and ``g`` for GPFQ), of shape ``[groups, K, K]``. The AXE
variants round with the accumulator constraint (``efqat_jax.ptq.axe``) for the layer's integer
inputs, with the columns (and the statistics) in the block's ``accumulation_order``, so that each
tile is the run of inputs one accumulator sums; a layer with float inputs has no integer
accumulator and gets its base algorithm.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efqat_jax.errors import ConfigError
from efqat_jax.fields import Check, Field, boolean, integer, number, one_of
from efqat_jax.nn.formats import Formats, spec_from_json, with_accumulator
from efqat_jax.nn.layer_table import QuantizedLayer
from efqat_jax.ptq.axe import accumulator_rounder
from efqat_jax.ptq.columns import ColumnRounder, grid_rounder
from efqat_jax.ptq.gpfq import gpfq
from efqat_jax.ptq.methods import PTQ_METHODS, PtqMethod
from efqat_jax.ptq.optq import dead_inputs, optq
from efqat_jax.quant.accumulator import ACCUMULATION_ORDERS, AccumulatorSpec, input_range
from efqat_jax.quant.fake_quant import fake_quant
from efqat_jax.quant.rows import (
  column_permutation,
  from_rows,
  kernel_axes,
  scale_rows,
  summation_axes,
  to_rows,
)

COLUMN_FIELDS = {
  "act_order": Field(True, "round inputs by captured energy diag(H), largest first", boolean()),
  "block_size": Field(128, "columns per block of lazy updates (speed only)", integer(1)),
}
OPTQ_FIELDS = {
  "damping": Field(
    0.1,
    "added to diag(H), relative to its mean: regularises a rank-deficient H (bench/layerwise_ptq.py)",
    number(0, lo_open=True),
  ),
  **COLUMN_FIELDS,
}
ACCUMULATOR_FIELDS = {
  "accumulator_bits": Field(
    16, "P: bits of the signed accumulator (inner one if tiled)", integer(3, 32)
  ),
  "accumulator_tile": Field(
    0,
    "inputs per accumulator tile (multi-stage accumulation); 0: one accumulator per channel",
    Check("0, or an integer >= 3", lambda v: integer(0).ok(v) and v != 1 and v != 2),
  ),
  "accumulation_order": Field(
    "hwc",
    "order a convolution's inputs are summed in, which decides its tiles: hwc = (kernel row,"
    " kernel column, input channel), as NHWC im2col and Flax's HWIO kernels; chw = (input"
    " channel, kernel row, kernel column), as NCHW / PyTorch (recorded in the export)",
    one_of(*ACCUMULATION_ORDERS),
  ),
}


def split_groups(rows: jax.Array, groups: int) -> jax.Array:
  """``[OC, K]`` as ``[groups, OC / groups, K]`` (a grouped convolution's output channels)."""
  return rows.reshape(groups, rows.shape[0] // groups, *rows.shape[1:])


def conv_groups(layer: QuantizedLayer) -> int:
  return dict(layer.op).get("feature_group_count", 1)


def settings_accumulator(settings: Any) -> AccumulatorSpec | None:
  """The accumulator an AXE method's block asks for (None for a block without one)."""
  bits = getattr(settings, "accumulator_bits", None)
  if bits is None:
    return None
  return AccumulatorSpec(bits, settings.accumulator_tile or None, settings.accumulation_order)


def layer_accumulator(layer: QuantizedLayer, settings: Any) -> AccumulatorSpec | None:
  """The accumulator the layer's weights must fit: the block's, for a layer with integer
  inputs (a layer with float inputs has no integer accumulator)."""
  return None if layer.input_spec is None else settings_accumulator(settings)


def layer_rounder(
  weight: jax.Array,
  scales: jax.Array,
  layer: QuantizedLayer,
  settings: Any,
  dead: jax.Array | None = None,
) -> ColumnRounder:
  """Round to nearest on the layer's grid, under the accumulator constraint when ``settings``
  has one and the layer's inputs are integers (``weight``'s columns in its accumulation order;
  ``dead``: the inputs that never fire)."""
  spec = layer.weight_spec
  group_size = spec.group_size if spec.granularity == "group" else weight.shape[1]
  accumulator = layer_accumulator(layer, settings)
  if accumulator is None:
    return grid_rounder(scales, group_size, spec.qmin, spec.qmax)
  if spec.granularity == "group" and accumulator.tile != spec.group_size:
    raise ConfigError(
      f"accumulator_tile = {settings.accumulator_tile} with weight scales per group of"
      f" {spec.group_size} inputs ({layer.path}): the tile must equal the group size"
    )
  return accumulator_rounder(
    weight, scales, group_size, spec.qmin, spec.qmax, layer.input_spec, accumulator, dead
  )


def by_rows(algorithm: Callable) -> Callable:
  """A ``PtqMethod.quantize_weight`` from ``algorithm(rows, stats, rounder, settings)``
  on one weight matrix; embedding lookups (no inputs to capture) round to nearest.

  The rows' columns are the layer's inputs in its accumulator's order (``summation_axes``);
  the statistics, captured in the op's own order (``kernel_axes``), are permuted to match.
  """

  @functools.wraps(algorithm)
  def quantize_weight(weight, scale, layer, statistics, settings):
    op = dict(layer.op)
    if op["op"] == "take":
      return fake_quant(weight, scale, spec=layer.weight_spec)
    out_axes, captured = kernel_axes(op["op"], op["dimension_numbers"], weight.ndim)
    in_axes = captured
    accumulator = layer_accumulator(layer, settings)
    if accumulator is not None:
      _, in_axes = summation_axes(op["op"], op["dimension_numbers"], weight.ndim, accumulator.order)
    statistics = permuted(statistics, column_permutation(weight.shape, captured, in_axes))
    rows = to_rows(weight.astype(jnp.float32), out_axes, in_axes)
    scales = scale_rows(scale, layer.weight_spec, weight.shape, out_axes, in_axes)
    groups = conv_groups(layer)

    def one_group(rows, scales, stats):
      rounder = layer_rounder(rows, scales, layer, settings, dead_inputs(stats["h"]))
      return algorithm(rows, stats, rounder, settings)

    values = jax.vmap(one_group)(
      split_groups(rows, groups), split_groups(scales, groups), dict(statistics)
    )
    values = values.reshape(rows.shape)
    return from_rows(values, weight.shape, out_axes, in_axes).astype(weight.dtype)

  return quantize_weight


def permuted(statistics: Mapping[str, jax.Array], order: np.ndarray) -> dict[str, jax.Array]:
  """``[..., K, K]`` statistics with both input axes taken in ``order`` (as given if it is the
  identity)."""
  if np.array_equal(order, np.arange(order.size)):
    return dict(statistics)
  return {name: s[..., order, :][..., order] for name, s in statistics.items()}


def _optq(rows, stats, rounder, settings):
  return optq(rows, stats["h"], rounder, settings.damping, settings.act_order, settings.block_size)


def _gpfq(rows, stats, rounder, settings):
  return gpfq(rows, stats["h"], stats["g"], rounder, settings.act_order, settings.block_size)


def check_accumulator(name: str, settings: Any, formats: Formats) -> None:
  """Every layer with integer inputs has room for a non-zero weight at ``accumulator_bits``."""
  bits = settings.accumulator_bits
  limit = AccumulatorSpec(bits).limit
  for path, spec in formats.items():
    input_spec = spec_from_json(spec["input"])
    if input_spec is None:
      continue
    mu, nu = input_range(input_spec)
    if max(nu, -mu) > limit:
      need = max(nu, -mu).bit_length() + 1
      raise ConfigError(
        f"config.ptq.{name}.accumulator_bits = {bits} leaves no room for any non-zero weight of"
        f" {path} ({input_spec.bits}-bit inputs): allowed an integer in {need}..32"
      )


def accumulator_formats(settings: Any, formats: Formats) -> Formats:
  """Every layer with integer inputs keeps its sums within ``accumulator_bits`` (per tile)."""
  return with_accumulator(formats, settings_accumulator(settings))


def _register(name: str, algorithm, statistics, fields: Mapping, summary: str, axe: bool = False):
  check = functools.partial(check_accumulator, name) if axe else None
  formats = accumulator_formats if axe else None
  method = PtqMethod(by_rows(algorithm), summary, dict(fields), statistics, check, formats)
  return PTQ_METHODS.register(name, method)


OPTQ = _register("optq", _optq, ("h",), OPTQ_FIELDS, "OPTQ (GPTQ): error feedback through H^-1")
GPFQ = _register("gpfq", _gpfq, ("h", "g"), COLUMN_FIELDS, "GPFQ: greedy path following")
AXE_OPTQ = _register(
  "axe_optq",
  _optq,
  ("h",),
  {**OPTQ_FIELDS, **ACCUMULATOR_FIELDS},
  "OPTQ with AXE's accumulator constraint (overflow-free at accumulator_bits)",
  axe=True,
)
AXE_GPFQ = _register(
  "axe_gpfq",
  _gpfq,
  ("h", "g"),
  {**COLUMN_FIELDS, **ACCUMULATOR_FIELDS},
  "GPFQ with AXE's accumulator constraint (overflow-free at accumulator_bits)",
  axe=True,
)
