"""The QAT stages ``qat`` and ``efqat``, and the registries of the QAT variants they run and
of the losses they train on.

A QAT variant trains the quantized model from the PTQ result: ``full`` trains every param,
``efqat`` the channels or layers it selects by importance. Stage ``qat`` runs the variant
``config.qat.method``; stage ``efqat`` always runs ``efqat``, so that the default pipeline
compares the two side by side. A variant's own settings live in ``config.<variant name>``.

A QAT loss is what each step minimises (``<stage>.loss``): ``task``, the task's loss alone, or
one that guides training, e.g. ``block_replacement`` with the full-precision model as partner;
any variant trains on any loss. A loss's settings live in ``config.<loss name>``.

Adding a variant is one module that calls ``QAT_VARIANTS.register`` (see ``qat_full.py``); adding
a loss, one that calls ``QAT_LOSSES.register`` (see ``qat_block_replacement.py``).
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
from efqat_jax.pipeline.context import TRAIN_SEED, Run
from efqat_jax.pipeline.stage import STAGES, ModelState, Stage
from efqat_jax.pipeline.training import training_fields
from efqat_jax.registry import Registry
from efqat_jax.train import TrainState, classification_loss
from efqat_jax.train.losses import LossFn


@dataclasses.dataclass(frozen=True)
class QatVariant:
  """A registered QAT variant.

  Attributes:
    train: ``(run, stage, qmodel, variables, cfg, fp, **step_options) -> (state, result
      fields)``; trains (or resumes) ``qmodel`` from the PTQ ``variables`` with the stage's
      block ``cfg``, in the stage's checkpoint directory (``fp``: the fp stage's output where
      ``needs_fp`` or the loss asks for it, else None), passing ``step_options`` on to
      ``pipeline.training.train``: ``constrain`` (None, or ``params -> params``: the PTQ
      result's constraint, e.g. its accumulators, applied after every update) and ``loss_fn``
      (the stage's loss); the fields go into the stage's result.
    summary: one line for the field listing.
    fields: its settings block ``config.<name>`` (merged with a stage block of that name).
    needs_fp: ``config -> bool``, whether under ``config`` it reads the full-precision model
      (the stage then takes the fp stage's output as an input too).
  """

  train: Callable[..., tuple[TrainState, dict]]
  summary: str
  fields: Schema = dataclasses.field(default_factory=dict)
  needs_fp: Callable[[ml_collections.ConfigDict], bool] = lambda config: False


QAT_VARIANTS: Registry[QatVariant] = Registry("qat.method")


@dataclasses.dataclass(frozen=True)
class QatLoss:
  """A registered QAT loss.

  Attributes:
    make: ``(run, qmodel, variables, fp, settings) -> loss_fn`` for ``make_train_step``: the
      quantized model, its PTQ ``variables``, the ``fp`` stage's output (None unless
      ``needs_fp``) and the loss's block ``config.<name>``.
    summary: one line for the field listing.
    fields: its settings block ``config.<name>``.
    needs_fp: whether it reads the full-precision model (the stage then takes the fp stage's
      output as an input too).
    check: optional ``(run, settings) -> None`` raising ConfigError before any file is written.
  """

  make: Callable[[Run, Any, dict, ModelState | None, Any], LossFn]
  summary: str
  fields: Schema = dataclasses.field(default_factory=dict)
  needs_fp: bool = False
  check: Callable[[Run, Any], None] | None = None


QAT_LOSSES: Registry[QatLoss] = Registry("qat.loss")
TASK = QAT_LOSSES.register(
  "task",
  QatLoss(lambda *_: classification_loss, summary="the task's loss alone (cross-entropy)"),
)


def stage_method(config: ml_collections.ConfigDict, stage: str) -> str:
  """The variant a QAT stage runs."""
  return config[stage].method if stage == "qat" else stage


def _run_stage(stage: str) -> Callable[[Run, dict[str, ModelState]], ModelState]:
  def run_stage(run: Run, inputs: dict[str, ModelState]) -> ModelState:
    ptq = inputs["ptq"]
    method, loss = stage_method(run.config, stage), run.config[stage].loss
    qmodel = run.quantized_model(ptq.formats)
    start = time.perf_counter()
    constrain = accumulator_constraint(qmodel, ptq.variables, run.sample_inputs, ptq.formats)
    loss_fn = QAT_LOSSES.get(loss).make(
      run, qmodel, ptq.variables, inputs.get("fp"), run.config.get(loss)
    )
    state, extra = QAT_VARIANTS.get(method).train(
      run,
      stage,
      qmodel,
      ptq.variables,
      run.config[stage],
      inputs.get("fp"),
      constrain=constrain,
      loss_fn=loss_fn,
    )
    if stage not in run.results:
      trained = time.perf_counter()
      result = run.evaluate(qmodel, state, stage)
      wall = time.perf_counter() - start
      times = {
        "wall_time_s": wall,
        "train_time_s": trained - start,
        "eval_time_s": wall - (trained - start),
      }
      fields = {**times, "method": method, "qat_loss": loss, **extra}
      run.record(stage, {**result, **fields})
    return ModelState(jax.device_get(state.variables), ptq.formats)

  return run_stage


def _fields(stage: str) -> Callable[[ml_collections.ConfigDict], tuple[str, ...]]:
  def fields(config):
    method, loss = stage_method(config, stage), config[stage].loss
    own = (stage, TRAIN_SEED)
    if method != stage and QAT_VARIANTS.get(method).fields:
      own += (method,)
    return own + ((loss,) if QAT_LOSSES.get(loss).fields else ())

  return fields


def _needs(stage: str) -> Callable[[ml_collections.ConfigDict, set[str]], tuple[str, ...]]:
  def needs(config, finished):
    variant = QAT_VARIANTS.get(stage_method(config, stage))
    fp = QAT_LOSSES.get(config[stage].loss).needs_fp or variant.needs_fp(config)
    return ("ptq", "fp") if fp else ("ptq",)

  return needs


def _check(stage: str) -> Callable[[Run], None]:
  def check(run):
    name = run.config[stage].loss
    loss = QAT_LOSSES.get(name)
    if loss.check is not None:
      loss.check(run, run.config.get(name))

  return check


def _loss_field() -> dict[str, Field]:
  losses = QAT_LOSSES.names()
  return {"loss": Field("task", f"training loss: one of {list(losses)}", one_of(*losses))}


def _loss_blocks() -> dict[str, Schema]:
  return {name: loss.fields for name, loss in QAT_LOSSES.items() if loss.fields}


def _qat_blocks() -> dict[str, Schema]:
  methods = QAT_VARIANTS.names()
  method = Field("full", f"QAT variant: one of {list(methods)}", one_of(*methods))
  variant_blocks = {name: v.fields for name, v in QAT_VARIANTS.items() if v.fields}
  qat = {**training_fields(), "method": method, **_loss_field()}
  return {"qat": qat, **variant_blocks, **_loss_blocks()}


def _qat_stage(name: str, summary: str, blocks: Callable[[], dict[str, Schema]]) -> Stage:
  stage = Stage(
    run=_run_stage(name),
    needs=_needs(name),
    fields=_fields(name),
    summary=summary,
    blocks=blocks,
    check=_check(name),
  )
  return STAGES.register(name, stage)


QAT = _qat_stage("qat", "fine-tune the PTQ model with the variant config.qat.method", _qat_blocks)
EFQAT = _qat_stage(
  "efqat",
  "EfQAT from the PTQ model: train only the most important channels or layers",
  lambda: {
    "efqat": {**training_fields(), **QAT_VARIANTS.get("efqat").fields, **_loss_field()},
    **_loss_blocks(),
  },
)
