"""Training: state, optimizer builder, losses, jitted data-parallel steps over a user loss."""

from efqat_jax.train.checkpoint import Checkpointer
from efqat_jax.train.interrupt import (
  Interrupted,
  interrupt_guard,
  raise_if_interrupted,
  stop_on_signals,
)
from efqat_jax.train.loop import KeepsHostState, train_loop
from efqat_jax.train.losses import (
  Apply,
  LossFn,
  accuracy,
  classification_loss,
  cross_entropy,
  masked_mean,
)
from efqat_jax.train.metrics import MetricWriter, read_scalars
from efqat_jax.train.optimizer import OPTIMIZERS, make_optimizer, param_labels, quant_aware
from efqat_jax.train.state import TrainState, create_train_state
from efqat_jax.train.step import (
  DATA_AXIS,
  ParamContext,
  make_eval_step,
  make_mesh,
  make_train_step,
  replicate,
  shard_batch,
)

__all__ = [
  "Apply",
  "Checkpointer",
  "DATA_AXIS",
  "Interrupted",
  "KeepsHostState",
  "LossFn",
  "MetricWriter",
  "OPTIMIZERS",
  "ParamContext",
  "TrainState",
  "accuracy",
  "classification_loss",
  "create_train_state",
  "cross_entropy",
  "interrupt_guard",
  "make_eval_step",
  "make_mesh",
  "make_optimizer",
  "make_train_step",
  "masked_mean",
  "param_labels",
  "quant_aware",
  "raise_if_interrupted",
  "read_scalars",
  "replicate",
  "shard_batch",
  "stop_on_signals",
  "train_loop",
]
