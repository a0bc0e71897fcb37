"""Flax Linen layers and model rewriting for quantization."""

from efqat_jax.nn.export import export_integer, integer_apply, with_mode
from efqat_jax.nn.intercept import QuantizedModel, QuantRule, quantize
from efqat_jax.nn.layer_table import GRAD_CHANNELS, QuantizedLayer, quantized_layers
from efqat_jax.nn.layers import QuantConv, QuantDense, QuantDenseGeneral
from efqat_jax.nn.ops import ACCUMULATOR_MAX, QUANT_STATS, Mode, QuantizedOps
from efqat_jax.nn.partial_grad import channel_subset_grad

__all__ = [
  "ACCUMULATOR_MAX",
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
  "channel_subset_grad",
  "export_integer",
  "integer_apply",
  "quantize",
  "quantized_layers",
  "with_mode",
]
