"""QAT variant ``full``: every param of the quantized model trains (weights, scales, zero points)."""

from __future__ import annotations

from efqat_jax.pipeline.qat import QAT_VARIANTS, QatVariant
from efqat_jax.pipeline.training import train


def train_full(run, stage, qmodel, variables, cfg, fp, **step_options):
  del fp  # not read
  return train(run, stage, qmodel, variables, cfg, **step_options), {}


FULL = QAT_VARIANTS.register("full", QatVariant(train_full, summary="train every param"))
