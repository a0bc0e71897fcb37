"""QAT loss ``block_replacement``: the quantized model trains guided by the full-precision
model (the fp stage's) as its frozen partner, through mixed-precision branches
(``efqat_jax.qat.block_replacement``). Any QAT variant trains on it: ``config.qat.loss`` or
``config.efqat.loss = "block_replacement"``; its settings are ``config.block_replacement``.
"""

from __future__ import annotations

from efqat_jax.errors import ConfigError
from efqat_jax.fields import Field, number, one_of, text
from efqat_jax.nn import quantized_layers
from efqat_jax.pipeline.ptq import config_layers
from efqat_jax.pipeline.qat import QAT_LOSSES, QatLoss
from efqat_jax.qat.block_replacement import (
  READINGS,
  REDUCTIONS,
  Replacement,
  block_replacement_loss,
  find_boundaries,
)

FIELD = "config.block_replacement.boundaries"
BLOCK_REPLACEMENT_FIELDS = {
  "boundaries": Field(
    "auto",
    "module paths where blocks 2..n start, comma-separated in call order (a stacked module:"
    " each unit); auto: every top-level module but the first",
    text(),
  ),
  "reading": Field(
    "prefix",
    "prefix: branch i runs the quantized blocks 1..i, then full precision; swap: only block i"
    " quantized",
    one_of(*READINGS),
  ),
  "distill_weight": Field(1.0, "beta: weight of KD from the full-precision logits", number(0)),
  "branch_weight": Field(1.0, "gamma: weight of the branches' CE + KD", number(0)),
  "temperature": Field(1.0, "tau of the distillation terms", number(0, lo_open=True)),
  "branch_reduction": Field("sum", "sum or mean of the branch terms", one_of(*REDUCTIONS)),
}


def replacement(layers, settings) -> Replacement:
  """The ``Replacement`` the settings give a model with ``layers``; ConfigError on bad
  boundaries."""
  try:
    boundaries = find_boundaries(layers, settings.boundaries, FIELD)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  rest = {name: settings[name] for name in BLOCK_REPLACEMENT_FIELDS if name != "boundaries"}
  return Replacement(boundaries, **rest)


def check_boundaries(run, settings) -> None:
  replacement(config_layers(run, run.placeholder_inputs()), settings)


def make_loss(run, qmodel, variables, fp, settings):
  layers = quantized_layers(qmodel, variables, run.sample_inputs, train=False)
  return block_replacement_loss(run.model, fp.variables, replacement(layers, settings))


BLOCK_REPLACEMENT = QAT_LOSSES.register(
  "block_replacement",
  QatLoss(
    make_loss,
    summary="task loss, KD from the full-precision model, and its mixed-precision branches",
    fields=BLOCK_REPLACEMENT_FIELDS,
    needs_fp=True,
    check=check_boundaries,
  ),
)
