"""Jitted train and eval steps, data-parallel over a device mesh.

The batch is sharded along its leading axis over the mesh axis ``"data"`` and the state is
replicated; XLA inserts the cross-device gradient reduction, so the step computes the same
update on 1 or 8 devices (up to float reduction order).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import Partial

from efqat_jax.train.losses import Apply, LossFn, classification_loss
from efqat_jax.train.state import TrainState
from efqat_jax.trees import merge_trees

DATA_AXIS = "data"
Batch = dict[str, jax.Array]  # what the loss_fn reads, e.g. "inputs", "labels", "mask"
# ``param_context(params, extra)``: a context manager yielding the params of the forward pass.
ParamContext = Callable[[Any, Any], contextlib.AbstractContextManager[Any]]


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


def _make_apply(model: nn.Module, variables: dict, mutable: Sequence[str]) -> tuple[Apply, dict]:
  """An ``apply(*args, **kwargs)`` closure over ``variables`` and the dict it collects the
  updates of the ``mutable`` collections in.

  Each call sees the updates of the calls before it (a model applied twice in one loss, e.g.
  two towers, updates its batch statistics twice), and its updates are merged into the dict.
  A call that passes ``mutable=`` itself (a list, or True for all) gets ``(out, collections)``
  back as from ``model.apply``: those collections are the caller's, and only the updates of
  the others are merged (``mutable=True`` keeps nothing). ``edit_params=fn`` runs the call
  with ``fn(params)`` instead of the params (e.g. to feed a block's input in, ``nn.blocks``).
  """
  updates: dict = {}

  def apply(*args, **kwargs):
    asked, edit = kwargs.pop("mutable", None), kwargs.pop("edit_params", None)
    current = merge_trees(variables, updates) if updates else variables
    if edit is not None:
      current = {**current, "params": edit(current["params"])}
    if asked is None and not mutable:
      return model.apply(current, *args, **kwargs)
    if asked is True:
      return model.apply(current, *args, mutable=True, **kwargs)
    own = [c for c in mutable if c not in (asked or ())]
    out, new = model.apply(current, *args, mutable=[*own, *(asked or ())], **kwargs)
    updates.update(merge_trees(updates, {c: new[c] for c in own if c in new}))
    if asked is None:
      return out
    return out, {c: new[c] for c in asked if c in new}

  return apply, updates


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  loss_fn: LossFn = classification_loss,
  *,
  param_context: ParamContext | None = None,
  constrain: Callable[[Any], Any] | None = None,
) -> TrainStep:
  """A jitted ``step(state, batch, rng, extra=None) -> (state, metrics)`` training ``model``
  with ``tx`` on the loss that ``loss_fn`` computes.

  ``loss_fn(apply, batch, rng, train=True)`` runs the model through ``apply`` (params and every
  collection of the state, those other than ``quant_stats`` mutable: their updates go into the
  new state) with ``rng`` the step's key (``rng`` folded with the step number). The state is
  donated. The step computes nothing that reads every gradient (no global gradient norm), so
  XLA can drop the gradient work of params a ``param_context`` makes constant.

  Args:
    model: the Flax module.
    tx: the optimizer.
    mesh: the data-parallel mesh (``make_mesh``); the state is replicated, the batch sharded.
    loss_fn: ``(apply, batch, rng, train) -> (loss, metrics)``; default ``classification_loss``.
      A ``jax.tree_util.Partial`` keeps its bound arrays (e.g. a frozen teacher's weights) as
      inputs of the compiled step, replicated over the mesh, not as constants baked into it.
    param_context: optional ``(params, extra) -> ContextManager[params]``, entered inside the
      differentiated function around ``loss_fn``; the params it yields are the ones the forward
      pass runs with. ``extra`` is the step's fourth argument (a pytree, e.g. EfQAT's
      TrainableSet with ``param_context=efqat_jax.efqat.restrict_backward``); the step retraces
      when its static parts change.
    constrain: optional ``params -> params`` applied to the params after every update (a
      projection onto a constraint set, e.g. ``efqat_jax.qat.project_params``).

  Returns:
    The compiled step (a ``TrainStep``); its metrics are ``{"loss": loss, **metrics}``.

  Raises:
    TypeError: if ``model`` is not a Linen module (see ``efqat_jax.nn.as_linen`` for NNX).
    ValueError: (when called) if ``extra`` is given without a ``param_context``.
  """
  if not isinstance(model, nn.Module):
    raise TypeError(
      f"make_train_step takes a Linen model, got {type(model).__name__}: for a quantized NNX"
      " model, pass efqat_jax.nn.as_linen(model), or train it in an NNX loop"
    )

  def step(state: TrainState, batch: Batch, rng: jax.Array, extra: Any, loss_fn: Partial):
    if extra is not None and param_context is None:
      raise ValueError(
        "step(state, batch, rng, extra) got an extra argument but make_train_step had no"
        " param_context to pass it to"
      )
    mutable = tuple(c for c in state.collections if c != "quant_stats")
    rng = jax.random.fold_in(rng, state.step)

    def loss(params):
      context = param_context(params, extra) if param_context else contextlib.nullcontext(params)
      with context as forward_params:
        variables = {**state.collections, "params": forward_params}
        apply, updates = _make_apply(model, variables, mutable)
        value, metrics = loss_fn(apply, batch, rng, True)
      return value, (metrics, updates)

    (value, (metrics, updates)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    new_state = state.replace(
      step=state.step + 1,
      params=params if constrain is None else constrain(params),
      opt_state=opt_state,
      collections={**state.collections, **updates},
    )
    return new_state, {"loss": value, **metrics}

  # Inputs keep the shardings they were placed with (``replicate``, ``shard_batch``).
  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(step, out_shardings=(replicated, replicated), donate_argnums=0)
  bound = loss_fn if isinstance(loss_fn, Partial) else Partial(loss_fn)
  return TrainStep(jitted, replicate(bound, mesh))


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """A compiled train step: ``step(state, batch, rng, extra=None) -> (state, metrics)``, and
  ``step.lower`` with the same arguments (for reading its HLO; the executable that ``compile()``
  gives takes ``step.loss_fn`` as a fifth argument)."""

  jitted: Callable
  loss_fn: Partial

  def __call__(self, state: TrainState, batch: Batch, rng: jax.Array, extra: Any = None):
    return self.jitted(state, batch, rng, extra, self.loss_fn)

  def lower(self, state: TrainState, batch: Batch, rng: jax.Array, extra: Any = None):
    return self.jitted.lower(state, batch, rng, extra, self.loss_fn)


def make_eval_step(
  model: nn.Module, mesh: Mesh, loss_fn: LossFn = classification_loss
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
  """A jitted ``eval_step(state, batch) -> {"loss", **metrics, "count"}``.

  Args:
    model: the Flax module.
    mesh: the data-parallel mesh; the state is replicated, the batch sharded.
    loss_fn: ``(apply, batch, rng=None, train=False) -> (loss, metrics)``; no collection is
      mutable.

  Returns:
    The jitted eval step; ``count`` is ``batch["mask"].sum()`` when the batch has a mask, else
    its leading size (weights for averaging over batches).
  """

  def eval_step(state: TrainState, batch: Batch):
    apply, _ = _make_apply(model, state.variables, ())
    value, metrics = loss_fn(apply, batch, None, False)
    mask = batch.get("mask")
    count = mask.sum() if mask is not None else jax.tree.leaves(batch)[0].shape[0]
    return {"loss": value, **metrics, "count": count}

  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  return jax.jit(eval_step, in_shardings=(replicated, sharded), out_shardings=replicated)
