"""Training: state, losses, jitted data-parallel steps."""

from efqat_jax.train.checkpoint import Checkpointer
from efqat_jax.train.loop import train_loop
from efqat_jax.train.losses import accuracy, cross_entropy, masked_mean
from efqat_jax.train.metrics import MetricWriter, read_scalars
from efqat_jax.train.state import TrainState, create_train_state
from efqat_jax.train.step import (
  DATA_AXIS,
  make_eval_step,
  make_mesh,
  make_train_step,
  replicate,
  shard_batch,
)

__all__ = [
  "Checkpointer",
  "DATA_AXIS",
  "MetricWriter",
  "TrainState",
  "accuracy",
  "create_train_state",
  "cross_entropy",
  "make_eval_step",
  "make_mesh",
  "make_train_step",
  "masked_mean",
  "read_scalars",
  "replicate",
  "shard_batch",
  "train_loop",
]
