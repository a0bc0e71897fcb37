"""Per-layer formats as plain JSON data, and the quantization rules that reproduce them.

The PTQ stage decides each layer's formats (from the config's rules, or a method's own per-layer
bit allocation) and stores them with its checkpoint; the stages after it rebuild the quantized
model from that record, never from the config.

Example:
  >>> formats = layer_formats(quantized_layers(qmodel, variables, x))
  >>> same = quantize(model, rules_from_formats(formats))
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from efqat_jax.nn.layer_table import QuantizedLayer
from efqat_jax.nn.rule import QuantRule
from efqat_jax.quant.accumulator import AccumulatorSpec
from efqat_jax.quant.spec import QuantSpec

# {layer path: {"weight": spec fields, "input": spec fields or None
#               [, "accumulator": {bits, tile, order}]}}
Formats = dict[str, dict[str, dict[str, Any] | None]]
# Formats saved before the accumulation order was recorded were made with the tiles taken in
# (input channel, kernel window) order.
LEGACY_ORDER = "chw"


def spec_to_json(spec: QuantSpec | None) -> dict[str, Any] | None:
  if spec is None:
    return None
  fields = dataclasses.asdict(spec)
  if isinstance(fields["axis"], tuple):
    fields["axis"] = list(fields["axis"])
  return fields


def spec_from_json(fields: Mapping[str, Any] | None) -> QuantSpec | None:
  if fields is None:
    return None
  axis = fields["axis"]
  return QuantSpec(**{**fields, "axis": tuple(axis) if isinstance(axis, list) else axis})


def layer_formats(layers: Mapping[str, QuantizedLayer]) -> Formats:
  """The weight and input format of every quantized layer, as JSON-ready dicts."""
  return {
    path: {"weight": spec_to_json(layer.weight_spec), "input": spec_to_json(layer.input_spec)}
    for path, layer in layers.items()
  }


def with_accumulator(formats: Formats, accumulator: AccumulatorSpec) -> Formats:
  """``formats`` with ``accumulator`` on every layer whose inputs are integers (a layer with
  float inputs has no integer accumulator)."""
  entry = dataclasses.asdict(accumulator)
  return {
    path: {**spec, "accumulator": entry} if spec["input"] is not None else spec
    for path, spec in formats.items()
  }


def accumulator_of(formats: Formats, path: str) -> AccumulatorSpec | None:
  """The accumulator the layer at ``path`` must not overflow, or None (unconstrained)."""
  entry = formats[path].get("accumulator")
  return None if entry is None else AccumulatorSpec(**{"order": LEGACY_ORDER, **entry})


def rules_from_formats(formats: Formats) -> list[QuantRule]:
  """One rule per layer path (exact match); every other layer stays in float."""
  return [
    QuantRule(
      re.escape(path),
      weight=spec_from_json(spec["weight"]),
      input=spec_from_json(spec["input"]),
    )
    for path, spec in formats.items()
  ]


def bits_summary(formats: Formats) -> str:
  """``"W4A4 x 5, W8A8 x 2"``: how many layers have each weight/input bit-width pair."""
  counts: dict[str, int] = {}
  for spec in formats.values():
    a = spec["input"]["bits"] if spec["input"] else "f"
    key = f"W{spec['weight']['bits']}A{a}"
    counts[key] = counts.get(key, 0) + 1
  summary = ", ".join(f"{k} x {n}" for k, n in counts.items())
  accumulators = {json.dumps(s["accumulator"]) for s in formats.values() if s.get("accumulator")}
  for entry in sorted(accumulators):
    spec = AccumulatorSpec(**{"order": LEGACY_ORDER, **json.loads(entry)})
    tile = "" if spec.tile is None else f", tiles of {spec.tile} in {spec.order} order"
    summary += f"; {spec.bits}-bit accumulators{tile}"
  return summary
