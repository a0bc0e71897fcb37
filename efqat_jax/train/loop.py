"""The training loop: resumable from checkpoints, with TensorBoard metrics and a progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import jax
import tqdm

from efqat_jax.train.checkpoint import Checkpointer
from efqat_jax.train.metrics import MetricWriter
from efqat_jax.train.state import TrainState

StepFn = Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]


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
  """Runs ``step_fn`` until ``state.step == num_steps``, resuming from the latest checkpoint.

  Args:
    state: the initial state (used as is when there is no checkpoint yet).
    step_fn: a jitted ``(state, batch, rng) -> (state, metrics)``.
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
    description: progress-bar label.
    progress: show a progress bar.

  Returns:
    The state after ``num_steps`` steps.
  """
  state = checkpointer.restore_latest(state)
  start = int(state.step)
  batches = batches_from(start)
  bar = tqdm.tqdm(
    total=num_steps, initial=start, desc=description, disable=not progress, dynamic_ncols=True
  )
  last, last_step = time.perf_counter(), start
  for step in range(start, num_steps):
    state, metrics = step_fn(state, next(batches), rng)
    done = step + 1
    if done % log_every == 0 or done == num_steps:
      metrics = {k: float(v) for k, v in metrics.items()}
      now = time.perf_counter()
      metrics["step_time_ms"] = (now - last) * 1e3 / (done - last_step)  # includes compilation
      last, last_step = now, done
      if learning_rate is not None:
        metrics["learning_rate"] = float(learning_rate(step))
      writer.write(done, metrics)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}")
    if done % checkpoint_every == 0 and done != num_steps:
      checkpointer.save(done, state)
    bar.update(1)
  bar.close()
  if int(state.step) != start or checkpointer.latest_step() is None:
    checkpointer.save(int(state.step), state, wait=True)
  return state
