"""The training loop: resumable from checkpoints, with TensorBoard metrics and a progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from efqat_jax.errors import NonFiniteError
from efqat_jax.train.checkpoint import Checkpointer
from efqat_jax.train.interrupt import interrupt_guard, raise_if_interrupted
from efqat_jax.train.metrics import MetricWriter
from efqat_jax.train.state import TrainState

StepFn = Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]


@runtime_checkable
class KeepsHostState(Protocol):
  """A step function with state on the host that a resumed run needs (e.g. which compiled step
  serves a selection: ``efqat_jax.efqat.ReselectingStep``): ``train_loop`` saves
  ``host_state()`` (a JSON dict) with every checkpoint and hands it back, as saved with the
  checkpoint it resumes from (None if there is none), to ``load_host_state`` before the first
  step."""

  def host_state(self) -> dict: ...

  def load_host_state(self, saved: dict | None) -> None: ...


@jax.jit
def _all_finite(params) -> jax.Array:
  """Whether every float leaf of ``params`` is finite."""
  leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))


def _last_good(checkpointer: Checkpointer) -> str:
  step = checkpointer.latest_step()
  if step is None:
    return "no checkpoint was saved"
  return f"the last good checkpoint, step {step} in {checkpointer.directory}, is kept"


def _check_loss(
  pending: list[tuple[int, jax.Array]], description: str, checkpointer: Checkpointer
) -> None:
  """Raises NonFiniteError naming the first step in ``pending`` (``(step, loss)`` pairs not yet
  checked, still on the device) whose loss is non-finite; empties ``pending``."""
  losses = jax.device_get([loss for _, loss in pending])
  for (step, _), loss in zip(pending, losses, strict=True):
    if not np.all(np.isfinite(loss)):
      raise NonFiniteError(
        f"stage {description!r}: the loss is non-finite at step {step}; training stopped and "
        f"{_last_good(checkpointer)}"
      )
  pending.clear()


def _check_params(
  step: int, state: TrainState, description: str, checkpointer: Checkpointer
) -> None:
  """Raises NonFiniteError if a float leaf of ``state.params`` (of step ``step``) is non-finite."""
  if not bool(_all_finite(state.params)):
    raise NonFiniteError(
      f"stage {description!r}: the parameters are non-finite at step {step} (the "
      f"loss was finite); training stopped and {_last_good(checkpointer)}"
    )


def _save_finite(
  checkpointer: Checkpointer,
  step: int,
  state: TrainState,
  pending: list[tuple[int, jax.Array]],
  description: str,
  step_fn: StepFn,
  wait: bool = False,
) -> None:
  """Saves ``state`` (with ``step_fn``'s host state, if it keeps one) as checkpoint ``step``
  unless a loss so far or its params are non-finite."""
  _check_loss(pending, description, checkpointer)
  _check_params(step, state, description, checkpointer)
  metadata = {"host_state": step_fn.host_state()} if isinstance(step_fn, KeepsHostState) else None
  checkpointer.save(step, state, metadata=metadata, wait=wait)


def train_loop(
  state: TrainState,
  step_fn: StepFn,
  batches_from: Callable[[int], Iterator[dict]],
  num_steps: int,
  *,
  checkpointer: Checkpointer,
  writer: MetricWriter,
  rng: jax.Array,
  checkpoint_every: int = 100,
  log_every: int = 10,
  learning_rate: Callable[[int], float] | None = None,
  description: str = "train",
  progress: bool = True,
) -> TrainState:
  """Runs ``step_fn`` until ``state.step == num_steps``, resuming from the newest intact
  checkpoint.

  Args:
    state: the initial state (used as is when there is no checkpoint yet).
    step_fn: a jitted ``(state, batch, rng) -> (state, metrics)``; if it keeps host state
      (``KeepsHostState``), that state is checkpointed and restored with the train state.
    batches_from: ``batches_from(step)`` yields the batches of the run from step ``step`` on, in
      the order an uninterrupted run would see them (so a resumed run reaches the same result).
    num_steps: total steps of the run.
    checkpointer: where checkpoints go; one is written every ``checkpoint_every`` steps and at
      the end.
    writer: TensorBoard writer for loss, accuracy, learning rate and step time.
    rng: the run's base key (each step folds in its step number).
    checkpoint_every: steps between checkpoints.
    log_every: steps between metric writes.
    learning_rate: optional schedule, logged with the metrics.
    description: progress-bar label, and the stage named in errors.
    progress: show a progress bar.

  Returns:
    The state after ``num_steps`` steps.

  Raises:
    NonFiniteError: a step's ``metrics["loss"]`` or the params to checkpoint are non-finite
      (step ``n`` is the ``n``-th update, as logged; nothing from it on is checkpointed).
    KeyboardInterrupt: on Ctrl-C, at the latest before the next step (even if it was swallowed).
  """
  state, metadata = checkpointer.restore_latest_with_metadata(state)
  if isinstance(step_fn, KeepsHostState):
    step_fn.load_host_state((metadata or {}).get("host_state"))
  start = int(state.step)
  batches = batches_from(start)
  bar = tqdm.tqdm(
    total=num_steps, initial=start, desc=description, disable=not progress, dynamic_ncols=True
  )
  pending = []  # (step, loss) not yet checked: kept on the device, read at log and save steps
  last, last_step = time.perf_counter(), start
  with interrupt_guard(), bar:
    for step in range(start, num_steps):
      raise_if_interrupted()
      state, metrics = step_fn(state, next(batches), rng)
      done = step + 1
      pending.append((done, metrics["loss"]))
      if done % log_every == 0 or done == num_steps:
        metrics = {k: float(v) for k, v in metrics.items()}
        now = time.perf_counter()
        metrics["step_time_ms"] = (now - last) * 1e3 / (done - last_step)  # with compilation
        last, last_step = now, done
        if learning_rate is not None:
          metrics["learning_rate"] = float(learning_rate(step))
        writer.write(done, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        _check_loss(pending, description, checkpointer)
      if done % checkpoint_every == 0 and done != num_steps:
        _save_finite(checkpointer, done, state, pending, description, step_fn)
      bar.update(1)
  if int(state.step) != start or checkpointer.latest_step() is None:
    _save_finite(checkpointer, int(state.step), state, pending, description, step_fn, wait=True)
  return state
