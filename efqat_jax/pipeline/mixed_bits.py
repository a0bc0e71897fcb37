"""Mixed precision in the PTQ stage: per-layer weight bits under the weight memory of the
uniform model (``config.quant``'s mixed-precision fields), for any PTQ method.

The high-precision layers (first and last by default) keep ``high_precision_bits`` and are
outside the budget; every other quantized layer gets a width from ``bit_candidates``
(``efqat_jax.ptq.mixed_precision``). The chosen formats travel with the PTQ result like any
other, so QAT, EfQAT and the export run with them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optax

from efqat_jax.errors import ConfigError
from efqat_jax.fields import Check, Field, number, one_of
from efqat_jax.nn.export import with_mode
from efqat_jax.nn.layer_table import QuantizedLayer
from efqat_jax.nn.ops import Mode
from efqat_jax.ptq.bit_allocation import allocate_bits, average_bits
from efqat_jax.ptq.mixed_precision import (
  IMPORTANCES,
  coding_length_importance,
  layer_sizes,
  sensitivity_importance,
)
from efqat_jax.train import create_train_state, make_eval_step, replicate

MIXED_FIELDS = {
  "mixed_precision": Field(
    "",
    "'': every layer at weight_bits; 'coding_length' or 'sensitivity': per-layer weight bits"
    " from bit_candidates within the weight memory of budget_bits",
    one_of("", *IMPORTANCES),
  ),
  "bit_candidates": Field(
    (2, 3, 4, 5, 6, 8),
    "weight bits a mixed-precision layer may take",
    Check(
      "a non-empty tuple of integers in 2..16",
      lambda v: (
        isinstance(v, tuple | list)
        and len(v) > 0
        and all(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 16 for b in v)
      ),
    ),
  ),
  "budget_bits": Field(
    0.0,
    "average weight bits of the mixed-precision layers; 0: weight_bits (the uniform model)",
    number(0),
  ),
  "coding_distortion": Field(
    0.1,
    "coding_length's RMS error per weight, relative to the kernel's RMS",
    number(0, lo_open=True),
  ),
}


def budget_of(quant: Any) -> float:
  return quant.budget_bits or quant.weight_bits


def check_budget(quant: Any) -> None:
  """A budget below the all-smallest-candidate model cannot be met."""
  if not quant.mixed_precision:
    return
  smallest = min(quant.bit_candidates)
  if budget_of(quant) < smallest:
    raise ConfigError(
      f"config.quant.budget_bits = {quant.budget_bits} is not allowed: at least the smallest of"
      f" config.quant.bit_candidates ({smallest} bits per weight), or 0 for weight_bits"
    )


def mixed_weight_bits(
  quant: Any,
  qmodel,
  variables: dict,
  layers: Mapping[str, QuantizedLayer],
  fixed: Sequence[str],
  batches: Sequence[dict],
  mesh,
) -> dict[str, int]:
  """The weight bits of every layer, from the float weights in ``variables``."""
  if quant.mixed_precision == "coding_length":
    importance = coding_length_importance(variables["params"], layers, quant.coding_distortion)
  else:
    eval_step = make_eval_step(with_mode(qmodel, Mode.FLOAT), mesh)

    def loss(params) -> float:
      state = replicate(create_train_state({**variables, "params": params}, optax.identity()), mesh)
      return sum(float(eval_step(state, b)["loss"]) for b in batches) / len(batches)

    importance = sensitivity_importance(
      loss, variables["params"], layers, quant.weight_bits, quant.weight_estimator
    )
  fixed_bits = {p: int(layers[p].weight_spec.bits) for p in fixed if p in layers}
  return allocate_bits(
    importance, layer_sizes(layers), tuple(quant.bit_candidates), budget_of(quant), fixed_bits
  )


def bits_report(
  quant: Any, bits: Mapping[str, int], layers: Mapping[str, QuantizedLayer], fixed: Sequence[str]
) -> dict:
  """The per-layer weight ``bits``, the budget and the average the free layers use (their
  sizes from ``layers``)."""
  free = {p: b for p, b in bits.items() if p not in fixed}
  return {
    "weight_bits_per_layer": dict(bits),
    "budget_bits": float(budget_of(quant)),
    "used_bits": average_bits(free, layer_sizes(layers)),
  }


def print_bits(report: Mapping[str, Any], how: str) -> None:
  rows = "\n".join(f"  {b:>2}  {p}" for p, b in report["weight_bits_per_layer"].items())
  print(
    f"ptq mixed precision ({how}): {report['used_bits']:.3f} of {report['budget_bits']:g}"
    f" bits per weight used\n bits  layer\n{rows}",
    flush=True,
  )
