"""Jitted train and eval steps, data-parallel over a device mesh.

The batch is sharded along its leading axis over the mesh axis ``"data"`` and the state is
replicated; XLA inserts the cross-device gradient reduction, so the step computes the same
update on 1 or 8 devices (up to float reduction order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from efqat_jax.efqat.backward import restrict_backward
from efqat_jax.efqat.selection import TrainableSet
from efqat_jax.train.losses import accuracy, cross_entropy
from efqat_jax.train.state import TrainState

DATA_AXIS = "data"
Batch = dict[str, jax.Array]  # "inputs", "labels", optional "mask"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh over ``devices`` (all visible devices by default)."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
  """Places a host batch on the mesh, split along the leading axis.

  Raises:
    ValueError: if the batch size is not a multiple of the number of devices.
  """
  n = mesh.devices.size
  for name, value in batch.items():
    if value.shape[0] % n:
      raise ValueError(
        f"batch[{name!r}] has leading size {value.shape[0]}, not a multiple of the {n} devices"
        " of the mesh: choose a batch size divisible by the device count"
      )
  return jax.device_put(batch, NamedSharding(mesh, P(DATA_AXIS)))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places ``tree`` (a TrainState, an rng) on every device of the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def _apply(model, state, params, batch, train, rng, mutable):
  variables = {**state.variables, "params": params}
  kwargs = dict(train=train, rngs={"dropout": rng} if rng is not None else None)
  if mutable:
    return model.apply(variables, batch["inputs"], mutable=list(mutable), **kwargs)
  return model.apply(variables, batch["inputs"], **kwargs), {}


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  loss_fn: Callable[..., jax.Array] = cross_entropy,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted ``step(state, batch, rng) -> (state, metrics)`` for ``model`` trained by ``tx``.

  Collections present in the state other than ``quant_stats`` (e.g. ``batch_stats``) are
  updated by the forward pass. The state is donated.

  With a ``trainable`` TrainableSet (EfQAT), the backward pass computes weight gradients only
  for the channels it selects (``efqat_jax.efqat.restrict_backward``); pair it with an optimizer from
  ``efqat_jax.efqat.freeze_unselected`` so the rest of the selection is frozen too. The step is
  retraced only when the TrainableSet's static counts change.
  """

  def step(state: TrainState, batch: Batch, rng: jax.Array, trainable: TrainableSet | None = None):
    mutable = tuple(c for c in state.collections if c != "quant_stats")
    rng = jax.random.fold_in(rng, state.step)

    def loss(params):
      with restrict_backward(params, trainable) as params:
        logits, updates = _apply(model, state, params, batch, True, rng, mutable)
      return loss_fn(logits, batch["labels"], batch.get("mask")), (logits, updates)

    (value, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, param_updates),
      opt_state=opt_state,
      collections={**state.collections, **updates},
    )
    metrics = {"loss": value, "accuracy": accuracy(logits, batch["labels"], batch.get("mask"))}
    return new_state, metrics

  # Inputs keep the shardings they were placed with (``replicate``, ``shard_batch``).
  replicated = NamedSharding(mesh, P())
  return jax.jit(step, out_shardings=(replicated, replicated), donate_argnums=0)


def make_eval_step(
  model: nn.Module, mesh: Mesh, loss_fn: Callable[..., jax.Array] = cross_entropy
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
  """A jitted ``eval_step(state, batch) -> metrics`` (loss, accuracy, number of examples)."""

  def eval_step(state: TrainState, batch: Batch):
    logits, _ = _apply(model, state, state.params, batch, False, None, ())
    mask = batch.get("mask")
    count = mask.sum() if mask is not None else batch["labels"].shape[0]
    return {
      "loss": loss_fn(logits, batch["labels"], mask),
      "accuracy": accuracy(logits, batch["labels"], mask),
      "count": count,
    }

  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  return jax.jit(eval_step, in_shardings=(replicated, sharded), out_shardings=replicated)
