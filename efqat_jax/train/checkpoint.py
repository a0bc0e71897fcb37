"""Orbax checkpoints of a TrainState: save every N steps, resume from the latest."""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Keeps the last ``max_to_keep`` checkpoints of one training stage in ``directory``.

  Example:
    >>> ckpt = Checkpointer(workdir / "qat")
    >>> state = ckpt.restore_latest(state)   # unchanged if there is no checkpoint yet
    >>> ckpt.save(int(state.step), state)
  """

  def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, wait: bool = False) -> None:
    """Writes ``state`` as checkpoint ``step`` (asynchronously unless ``wait``)."""
    self._manager.save(step, args=ocp.args.StandardSave(state))
    if wait:
      self._manager.wait_until_finished()

  def restore_latest(self, like: Any) -> Any:
    """The newest checkpoint restored with the structure, dtypes and shardings of ``like``;
    ``like`` itself if there is none."""
    step = self.latest_step()
    if step is None:
      return like
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(target))

  def read(self, step: int | None = None) -> Any:
    """Checkpoint ``step`` (default: the newest) as saved, without a target structure."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self._manager.restore(step)

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
