"""Framework-free quantization numerics: pure functions on arrays and a frozen QuantSpec."""

from efqat_jax.quant import accumulator, granularity, ranges
from efqat_jax.quant.accumulator import ACCUMULATION_ORDERS, AccumulatorSpec
from efqat_jax.quant.export_check import AccumulatorCheck, check_export_accumulators
from efqat_jax.quant.fake_quant import (
  check_scale_values,
  fake_quant,
  lsq_grad_scale,
  round_ste,
  valid_scale,
  valid_zero_point,
)
from efqat_jax.quant.integer import (
  IntegerLayer,
  apply_integer,
  dequantize,
  export_layer,
  int_dtype,
  integer_layer_arrays,
  quantize_to_int,
)
from efqat_jax.quant.overflow import OverflowReport, check_accumulator, check_accumulators
from efqat_jax.quant.spec import QuantSpec

__all__ = [
  "ACCUMULATION_ORDERS",
  "AccumulatorCheck",
  "AccumulatorSpec",
  "IntegerLayer",
  "OverflowReport",
  "QuantSpec",
  "accumulator",
  "apply_integer",
  "check_accumulator",
  "check_accumulators",
  "check_export_accumulators",
  "check_scale_values",
  "dequantize",
  "export_layer",
  "fake_quant",
  "granularity",
  "int_dtype",
  "integer_layer_arrays",
  "lsq_grad_scale",
  "quantize_to_int",
  "ranges",
  "round_ste",
  "valid_scale",
  "valid_zero_point",
]
