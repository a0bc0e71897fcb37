"""efqat_jax: efficient quantization-aware training for JAX/Flax.

The names below load on first use (PEP 562), so that ``python -m efqat_jax.main`` can restart
itself under jemalloc (``efqat_jax.allocator``) before JAX is imported, not after.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
  "Mode": "efqat_jax.nn",
  "QuantRule": "efqat_jax.nn",
  "export_integer": "efqat_jax.nn",
  "integer_apply": "efqat_jax.nn",
  "quantize": "efqat_jax.nn",
  "QuantSpec": "efqat_jax.quant",
  "fake_quant": "efqat_jax.quant",
}
_SUBPACKAGES = ("nn", "quant")

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

if TYPE_CHECKING:
  from efqat_jax import nn, quant
  from efqat_jax.nn import Mode, QuantRule, export_integer, integer_apply, quantize
  from efqat_jax.quant import QuantSpec, fake_quant


def __getattr__(name: str):
  if name in _SUBPACKAGES:
    return importlib.import_module(f"efqat_jax.{name}")
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'efqat_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted([*globals(), *__all__])
