"""The QAT stages ``qat`` and ``efqat``, and the registry of QAT variants they run.

A QAT variant trains the quantized model from the PTQ result: ``full`` trains every param,
``efqat`` the channels or layers it selects by importance. Stage ``qat`` runs the variant
``config.qat.method``; stage ``efqat`` always runs ``efqat``, so that the default pipeline
compares the two side by side. A variant's own settings live in ``config.<variant name>``.

Adding a variant is one module that calls ``QAT_VARIANTS.register``; see ``qat_full.py``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from efqat_jax.fields import Field, Schema, one_of
from efqat_jax.pipeline.accumulators import accumulator_constraint
from efqat_jax.pipeline.context import Run
from efqat_jax.pipeline.stage import STAGES, ModelState, Stage
from efqat_jax.pipeline.training import training_fields
from efqat_jax.registry import Registry
from efqat_jax.train import TrainState


@dataclasses.dataclass(frozen=True)
class QatVariant:
  """A registered QAT variant.

  Attributes:
    train: ``(run, stage, qmodel, variables, cfg, constrain) -> (state, result fields)``; trains
      (or resumes) ``qmodel`` from the PTQ ``variables`` with the stage's block ``cfg``, in the
      stage's checkpoint directory, applying ``constrain`` (None, or ``params -> params``: the
      PTQ result's constraint, e.g. its accumulators) after every update; the fields go into
      the stage's result.
    summary: one line for the field listing.
    fields: its settings block ``config.<name>`` (merged with a stage block of that name).
  """

  train: Callable[
    [Run, str, Any, dict, ml_collections.ConfigDict, Callable | None], tuple[TrainState, dict]
  ]
  summary: str
  fields: Schema = dataclasses.field(default_factory=dict)


QAT_VARIANTS: Registry[QatVariant] = Registry("qat.method")


def stage_method(config: ml_collections.ConfigDict, stage: str) -> str:
  """The variant a QAT stage runs."""
  return config[stage].method if stage == "qat" else stage


def _run_stage(stage: str) -> Callable[[Run, dict[str, ModelState]], ModelState]:
  def run_stage(run: Run, inputs: dict[str, ModelState]) -> ModelState:
    ptq = inputs["ptq"]
    method = stage_method(run.config, stage)
    qmodel = run.quantized_model(ptq.formats)
    start = time.perf_counter()
    constrain = accumulator_constraint(qmodel, ptq.variables, run.sample_inputs, ptq.formats)
    state, extra = QAT_VARIANTS.get(method).train(
      run, stage, qmodel, ptq.variables, run.config[stage], constrain
    )
    if stage not in run.results:
      result = run.evaluate(qmodel, state, stage)
      run.record(
        stage, {**result, "wall_time_s": time.perf_counter() - start, "method": method, **extra}
      )
    return ModelState(jax.device_get(state.variables), ptq.formats)

  return run_stage


def _fields(stage: str) -> Callable[[ml_collections.ConfigDict], tuple[str, ...]]:
  def fields(config):
    method = stage_method(config, stage)
    variant = QAT_VARIANTS.get(method)
    own = (stage,)
    return own if method == stage or not variant.fields else (*own, method)

  return fields


def _qat_blocks() -> dict[str, Schema]:
  methods = QAT_VARIANTS.names()
  method = Field("full", f"QAT variant: one of {list(methods)}", one_of(*methods))
  variant_blocks = {name: v.fields for name, v in QAT_VARIANTS.items() if v.fields}
  return {"qat": {**training_fields(), "method": method}, **variant_blocks}


def _qat_stage(name: str, summary: str, blocks: Callable[[], dict[str, Schema]]) -> Stage:
  stage = Stage(
    run=_run_stage(name),
    needs=lambda config, finished: ("ptq",),
    fields=_fields(name),
    summary=summary,
    blocks=blocks,
  )
  return STAGES.register(name, stage)


QAT = _qat_stage("qat", "fine-tune the PTQ model with the variant config.qat.method", _qat_blocks)
EFQAT = _qat_stage(
  "efqat",
  "EfQAT from the PTQ model: train only the most important channels or layers",
  lambda: {"efqat": {**training_fields(), **QAT_VARIANTS.get("efqat").fields}},
)
