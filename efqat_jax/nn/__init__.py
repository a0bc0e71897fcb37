"""Flax Linen layers and model rewriting for quantization."""

from efqat_jax.nn.export import export_integer, integer_apply, with_mode
from efqat_jax.nn.intercept import QuantizedModel, QuantRule, quantize
from efqat_jax.nn.layers import QuantConv, QuantDense, QuantDenseGeneral
from efqat_jax.nn.ops import ACCUMULATOR, QUANT_STATS, Mode, QuantizedOps, weight_grad_channels
from efqat_jax.nn.partial_grad import channel_subset_grad

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
  "channel_subset_grad",
  "quantize",
  "weight_grad_channels",
  "with_mode",
]
