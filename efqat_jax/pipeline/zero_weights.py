"""Layers that PTQ left without a single non-zero weight: reported per layer, and refused unless
``config.ptq.allow_zeroed_layers``.

An accumulator constraint too tight for a layer (AXE with few accumulator bits) can round all of
its weights to zero. Such a model is trivially overflow-free, but the layer passes on nothing
but its bias and the accuracy falls to chance: the PTQ stage stops, before its checkpoint is
written, naming the layers and the field to loosen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from efqat_jax.errors import ConfigError
from efqat_jax.quant.integer import IntegerLayer


def zero_weight_shares(layers: Mapping[str, IntegerLayer]) -> dict[str, float]:
  """``{unit: share of its integer weights that are 0}`` of an exported model."""
  return {unit: float(np.mean(np.asarray(layer.weight) == 0)) for unit, layer in layers.items()}


def zeroed_layers(shares: Mapping[str, float]) -> list[str]:
  """The units whose weights are all zero."""
  return [unit for unit, share in shares.items() if share == 1.0]


def zero_weights_line(method: str, shares: Mapping[str, float]) -> str:
  """``"ptq axe_gpfq: zero weights per layer: Conv_0 3.1%, Conv_1 100.0% (all zero)"``."""
  parts = [
    f"{unit} {100 * share:.1f}%" + (" (all zero)" if share == 1.0 else "")
    for unit, share in shares.items()
  ]
  return f"ptq {method}: zero weights per layer: {', '.join(parts)}"


def check_zeroed_layers(ptq: Any, shares: Mapping[str, float]) -> None:
  """Raises ConfigError naming the layers whose weights are all zero, unless
  ``ptq.allow_zeroed_layers`` (``ptq``: the config's ``ptq`` block)."""
  zeroed = zeroed_layers(shares)
  if not zeroed or ptq.allow_zeroed_layers:
    return
  settings = ptq.get(ptq.method)
  bits = None if settings is None else settings.get("accumulator_bits")
  if bits is not None:
    loosen = f"raise config.ptq.{ptq.method}.accumulator_bits (now {bits})"
  else:
    loosen = "raise config.quant.weight_bits"
  raise ConfigError(
    f"ptq: {ptq.method} left every weight of {', '.join(zeroed)} at zero (the model would"
    f" pass on only their biases); {loosen}, or set config.ptq.allow_zeroed_layers = True"
  )
