"""efqat_jax: efficient quantization-aware training for JAX/Flax."""

from efqat_jax import nn, quant
from efqat_jax.nn import Mode, QuantRule, export_integer, integer_apply, quantize
from efqat_jax.quant import QuantSpec, fake_quant

__version__ = "0.1.0"

__all__ = [
  "Mode",
  "QuantRule",
  "QuantSpec",
  "export_integer",
  "fake_quant",
  "integer_apply",
  "nn",
  "quant",
  "quantize",
]
