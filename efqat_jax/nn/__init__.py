"""Quantized Flax layers and model rewriting (Linen and NNX)."""

from efqat_jax.nn.export import export_integer, integer_apply, with_mode
from efqat_jax.nn.formats import Formats, layer_formats, rules_from_formats
from efqat_jax.nn.intercept import QuantizedModel, quantize
from efqat_jax.nn.layer_table import GRAD_CHANNELS, QuantizedLayer, quantized_layers
from efqat_jax.nn.layers import QuantConv, QuantDense, QuantDenseGeneral
from efqat_jax.nn.nnx_linen import as_linen, to_nnx
from efqat_jax.nn.ops import (
  ACCUMULATOR_MAX,
  CAPTURED_INPUT,
  QUANT_STATS,
  Mode,
  QuantizedOps,
  capturing_inputs,
)
from efqat_jax.nn.partial_grad import channel_subset_grad
from efqat_jax.nn.rounding import (
  RoundingContext,
  WeightRounding,
  current_weight_rounding,
  round_to_nearest,
  weight_rounding,
)
from efqat_jax.nn.rule import QuantRule

__all__ = [
  "ACCUMULATOR_MAX",
  "CAPTURED_INPUT",
  "Formats",
  "GRAD_CHANNELS",
  "Mode",
  "QUANT_STATS",
  "QuantConv",
  "QuantDense",
  "QuantDenseGeneral",
  "QuantRule",
  "QuantizedLayer",
  "QuantizedModel",
  "QuantizedOps",
  "RoundingContext",
  "WeightRounding",
  "as_linen",
  "capturing_inputs",
  "channel_subset_grad",
  "current_weight_rounding",
  "export_integer",
  "integer_apply",
  "layer_formats",
  "quantize",
  "quantized_layers",
  "round_to_nearest",
  "rules_from_formats",
  "to_nnx",
  "weight_rounding",
  "with_mode",
]
