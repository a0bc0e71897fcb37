"""The training fields of a stage's config block, and training a model from variables."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from efqat_jax.fields import Field, integer, number, one_of
from efqat_jax.pipeline.context import Run
from efqat_jax.train import (
  MetricWriter,
  TrainState,
  classification_loss,
  create_train_state,
  make_optimizer,
  make_train_step,
  replicate,
  train_loop,
)
from efqat_jax.train.losses import LossFn


def training_fields(**defaults: Any) -> dict[str, Field]:
  """The optimizer fields of a training stage's block (``defaults`` overrides the defaults)."""
  d = (
    dict(
      steps=300,
      learning_rate=1e-3,
      optimizer="adamw",
      weight_decay=0.0,
      warmup_steps=20,
      quant_lr_multiplier=0.01,
    )
    | defaults
  )
  return {
    "steps": Field(d["steps"], "training steps", integer(0)),
    "learning_rate": Field(
      d["learning_rate"], "peak learning rate (cosine decay after warm-up)", number(0, lo_open=True)
    ),
    "optimizer": Field(d["optimizer"], "adamw, or sgd (momentum 0.9)", one_of("adamw", "sgd")),
    "weight_decay": Field(d["weight_decay"], "decoupled weight decay of the weights", number(0)),
    "warmup_steps": Field(d["warmup_steps"], "linear warm-up steps", integer(0)),
    "quant_lr_multiplier": Field(
      d["quant_lr_multiplier"], "learning-rate factor of scales and zero points", number(0)
    ),
  }


# A QAT variant may change the optimizer (``wrap_tx``), the loss's params (``param_context``)
# and the step itself (``wrap_step(step_fn, writer) -> step_fn``); ``constrain`` (from the PTQ
# result's formats, e.g. an accumulator projection) is applied to the params after every update;
# ``loss_fn`` is what the step minimises (the stage's QAT loss; default: the task's).
def train(
  run: Run,
  stage: str,
  model,
  variables: dict,
  cfg,
  *,
  wrap_tx: Callable | None = None,
  param_context: Callable | None = None,
  wrap_step: Callable[[Callable, MetricWriter], Callable] | None = None,
  constrain: Callable | None = None,
  loss_fn: LossFn = classification_loss,
) -> TrainState:
  """Trains ``model`` from ``variables`` for ``cfg.steps`` steps, resuming from the stage's
  checkpoints in ``<workdir>/<stage>``, data order and dropout seeded by ``run.stage_seed``;
  stops with NonFiniteError on a non-finite loss."""
  seed = run.stage_seed(stage)
  tx, schedule = make_optimizer(
    cfg.optimizer,
    learning_rate=cfg.learning_rate,
    steps=cfg.steps,
    warmup_steps=cfg.warmup_steps,
    weight_decay=cfg.weight_decay,
    quant_lr_multiplier=cfg.quant_lr_multiplier,
  )
  if wrap_tx is not None:
    tx = wrap_tx(tx)
  step_fn = make_train_step(
    model, tx, run.mesh, loss_fn, param_context=param_context, constrain=constrain
  )
  state = replicate(create_train_state(variables, tx), run.mesh)
  with run.checkpointer(stage) as ckpt, run.writer(stage) as writer:
    return train_loop(
      state,
      step_fn if wrap_step is None else wrap_step(step_fn, writer),
      functools.partial(run.train_batches, seed=seed),
      cfg.steps,
      checkpointer=ckpt,
      writer=writer,
      rng=jax.random.key(seed),
      checkpoint_every=run.config.checkpoint_every,
      log_every=run.config.log_every,
      learning_rate=schedule,
      description=stage,
      progress=run.config.progress,
    )
