"""Flax Linen layers and model rewriting for quantization."""

from efqat_jax.nn.export import export_integer, integer_apply, with_mode
from efqat_jax.nn.intercept import QuantizedModel, QuantRule, quantize
from efqat_jax.nn.layers import QuantConv, QuantDense, QuantDenseGeneral
from efqat_jax.nn.ops import ACCUMULATOR, QUANT_STATS, Mode, QuantizedOps
from efqat_jax.nn.partial_grad import leading_channels_grad

__all__ = [
  "ACCUMULATOR",
  "Mode",
  "QUANT_STATS",
  "QuantConv",
  "QuantDense",
  "QuantDenseGeneral",
  "QuantRule",
  "QuantizedModel",
  "QuantizedOps",
  "export_integer",
  "integer_apply",
  "leading_channels_grad",
  "quantize",
  "with_mode",
]
