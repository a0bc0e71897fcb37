"""The accumulator widths a quantized model needs, and the proof that it keeps its constraint.

Every layer with integer inputs is exported and checked exactly (``efqat_jax.quant.integer``):
the data-type bound ``P*`` (enough for any weights of its bit width) and the width its actual
integer weights need. A layer whose formats carry an accumulator (AXE) must fit it, also after
QAT: training projects its weights after every update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from efqat_jax.nn import quantized_layers
from efqat_jax.nn.formats import Formats, accumulator_of
from efqat_jax.qat import project_params
from efqat_jax.quant.accumulator import AccumulatorSpec
from efqat_jax.quant.integer import IntegerLayer
from efqat_jax.quant.overflow import check_accumulator

UNCONSTRAINED = AccumulatorSpec(bits=64)  # wide enough for any layer: only the widths count


def accumulator_report(layers: Mapping[str, IntegerLayer], formats: Formats) -> dict[str, Any]:
  """``{"accumulator_needed_bits", "accumulator_datatype_bound", "overflow_free",
  "accumulator_layers": {unit: {"datatype_bound", "needed_bits"[, "fits", "tile", "order"]}}}``
  of an exported model (``efqat_jax.nn.export_integer``).

  ``overflow_free`` is None when no layer has an accumulator constraint, else whether every
  constrained layer fits it (per tile of its inputs in its accumulation order).
  """
  units, constrained = {}, []
  for unit, layer in layers.items():
    if not layer.accumulates:
      continue
    spec = accumulator_of(formats, unit.partition("[")[0])
    report = check_accumulator(layer, spec or UNCONSTRAINED)
    units[unit] = {"datatype_bound": report.datatype_bound, "needed_bits": report.needed_bits}
    if spec is not None:
      units[unit] |= {"fits": report.fits, "tile": report.tile, "order": report.order}
      constrained.append(report.fits)
  return {
    "accumulator_needed_bits": max((u["needed_bits"] for u in units.values()), default=0),
    "accumulator_datatype_bound": max((u["datatype_bound"] for u in units.values()), default=0),
    "overflow_free": all(constrained) if constrained else None,
    "accumulator_layers": units,
  }


def overflowing(report: dict[str, Any]) -> list[str]:
  """The units of a report that overflow their accumulator constraint."""
  return [u for u, r in report["accumulator_layers"].items() if r.get("fits") is False]


def accumulator_constraint(qmodel, variables: dict, sample, formats: Formats) -> Callable | None:
  """``params -> params`` projecting every layer with an accumulator in ``formats`` back onto
  it (``efqat_jax.qat.project_params``), or None when no layer has one."""
  specs = {path: accumulator_of(formats, path) for path in formats}
  specs = {path: spec for path, spec in specs.items() if spec is not None}
  if not specs:
    return None
  layers = quantized_layers(qmodel, variables, sample, train=False)
  return functools.partial(project_params, layers=layers, accumulators=specs)
