"""Orbax checkpoints of a TrainState: save every N steps, resume from the newest intact one.

Each checkpoint holds two items written together (atomically, by one orbax save): ``state``,
the pytree, and ``meta``, a small JSON dict with a sha256 digest of the state's arrays and of
the caller's metadata. Once orbax has committed it, the sha256 of each of its files is recorded
beside them (``efqat_jax.train.checkpoint_files``). A restore checks the files first (so orbax never starts on a
checkpoint with a file missing or changed), then the digest of what it read; a checkpoint that
fails either is moved aside (``<step>.corrupt``, never deleted) and the next older one is used.

A write the file system refuses (no space left, a read-only disk) raises StorageError naming
the directory, and the unfinished checkpoint is removed (what a kill leaves unfinished is removed
when a Checkpointer next opens the directory): the checkpoints before it are intact.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import pathlib
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from efqat_jax.errors import CorruptCheckpointError, StorageError, storage_reason
from efqat_jax.train.checkpoint_files import FilesChanged, check_files, record_files
from efqat_jax.train.interrupt import deferred_interrupts

_STATE, _META = "state", "meta"
_TEMPORARY = "*.orbax-checkpoint-tmp*"  # what orbax writes a checkpoint into before committing it


class _Corrupt(Exception):
  """A checkpoint that was read but does not match its digest (or has none)."""


class _Mismatch(ValueError):
  """The state to restore into has other leaves than the checkpoint: the caller's mistake."""


def _key_name(key: Any) -> str:
  """The name of one key-path entry, the same for a dataclass field, dict key or list index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaves(tree: Any) -> list[tuple[list[str], Any]]:
  """``(path, leaf)`` pairs sorted by path: the same order for a dataclass and the dict that
  orbax reads back for it."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return sorted(
    (([_key_name(k) for k in path], leaf) for path, leaf in flat), key=lambda item: item[0]
  )


def _specs(tree: Any) -> list[list]:
  """``[path, shape, dtype]`` of every leaf, in ``_leaves`` order."""
  dtype = lambda x: np.dtype(x.dtype if hasattr(x, "dtype") else type(x)).name
  return [[path, list(np.shape(x)), dtype(x)] for path, x in _leaves(tree)]


def tree_digest(tree: Any, metadata: Any = None) -> str:
  """sha256 over every leaf's path, shape, dtype and bytes (on host), then ``metadata``'s JSON."""
  h = hashlib.sha256()
  for path, leaf in _leaves(jax.device_get(tree)):
    array = np.ascontiguousarray(leaf)
    h.update(json.dumps([path, array.shape, array.dtype.name]).encode())
    h.update(array.tobytes())
  h.update(json.dumps(metadata, sort_keys=True).encode())
  return h.hexdigest()


def _check_like(like: Any, leaves: list[list], path: pathlib.Path) -> None:
  """Raises _Mismatch unless ``like`` has the saved leaves' paths and shapes."""
  want = [(p, s) for p, s, _ in _specs(like)]
  have = [(p, s) for p, s, _ in leaves]
  if want != have:
    diff = sorted(set(map(str, want)) ^ set(map(str, have)))[:3]
    raise _Mismatch(
      f"checkpoint {path} holds other leaves (paths or shapes) than the state to restore "
      f"into, e.g. {', '.join(diff)}"
    )


def _target(like: Any, saved: dict[tuple[str, ...], str]) -> Any:
  """``like`` as a restore target (shapes and shardings) with the dtypes as saved."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(like)
  structs = []
  for path, leaf in flat:
    struct = ocp.utils.to_shape_dtype_struct(leaf)
    dtype = saved[tuple(_key_name(k) for k in path)]
    if isinstance(struct, jax.ShapeDtypeStruct) and struct.dtype.name != dtype:
      struct = struct.update(dtype=jnp.dtype(dtype))
    structs.append(struct)
  return jax.tree_util.tree_unflatten(treedef, structs)


def _cast_like(restored: Any, like: Any) -> Any:
  """``restored`` in ``like``'s dtype (as orbax would have cast it)."""
  dtype = getattr(like, "dtype", None)
  if dtype is None or getattr(restored, "dtype", dtype) == dtype:
    return restored
  return restored.astype(dtype)


def _describe(error: Exception) -> str:
  """One short line saying why a checkpoint is corrupt."""
  if isinstance(error, (_Corrupt, FilesChanged)):
    return str(error)
  while error.__cause__ is not None:  # orbax wraps the TensorStore error that names the file
    error = error.__cause__
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
  return f"unreadable, {text}"


def _is_orbax_leftover(unraisable) -> bool:
  """Whether an error Python could not raise is what orbax leaves when a read or write fails:
  the cleanup of the coroutines it abandons, or a TensorStore callback that finds orbax's event
  loop closed (each would be printed with a traceback, some with a page of TensorStore spec)."""
  code = getattr(unraisable.object, "cr_code", None)
  if code is not None and "orbax" in code.co_filename:
    return True
  error = unraisable.exc_value
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _quiet_orbax_leftovers() -> None:
  """Drops orbax's leftovers from ``sys.unraisablehook`` (other errors go on to it)."""
  hook = sys.unraisablehook
  if getattr(hook, "drops_orbax_leftovers", False):
    return

  def quiet(unraisable):
    if not _is_orbax_leftover(unraisable):
      hook(unraisable)

  quiet.drops_orbax_leftovers = True
  sys.unraisablehook = quiet


def _collect_orbax_leftovers() -> None:
  """Finalizes the reads orbax abandons when one fails (their cleanup errors dropped)."""
  _quiet_orbax_leftovers()
  gc.collect()


def _remove_temporaries(directory: pathlib.Path) -> None:
  """Removes the unfinished checkpoints in ``directory``, freeing their space. (After a failed
  save, TensorStore may still finish a write it had begun, recreating a folder: the manager
  removes what is left when it next starts.)"""
  for temporary in directory.glob(_TEMPORARY):
    shutil.rmtree(temporary, ignore_errors=True)


def _print_to_stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


class Checkpointer:
  """Keeps the last ``max_to_keep`` checkpoints of one training stage in ``directory``.

  Example:
    >>> ckpt = Checkpointer(workdir / "qat")
    >>> state = ckpt.restore_latest(state)   # unchanged if there is no checkpoint yet
    >>> ckpt.save(int(state.step), state)

  One process at a time may write to a directory: opening one removes the unfinished checkpoints
  (``*.orbax-checkpoint-tmp``) a killed or failed save left there.

  Args:
    directory: the stage's checkpoint directory (created if missing).
    max_to_keep: how many of the newest checkpoints are kept (>= 2 leaves one to fall back to).
    report: called with one line when a corrupt checkpoint is moved aside (default: stderr).
  """

  def __init__(
    self,
    directory: str | pathlib.Path,
    max_to_keep: int = 2,
    *,
    report: Callable[[str], None] | None = None,
  ):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = pathlib.Path(directory).absolute()
    self._report = report or _print_to_stderr
    self._unrecorded: list[int] = []  # saved steps whose files are not yet recorded
    _quiet_orbax_leftovers()
    with self._writing():
      self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
        ),
        item_names=(_STATE, _META),
      )

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint (not yet verified), or None."""
    return self._manager.latest_step()

  def save(
    self, step: int, state: Any, *, metadata: dict | None = None, wait: bool = False
  ) -> None:
    """Writes ``state`` and the JSON dict ``metadata`` as checkpoint ``step``, with their digest
    (asynchronously unless ``wait``)."""
    metadata = json.loads(json.dumps(metadata))  # as it reads back (tuples become lists)
    meta = {"digest": tree_digest(state, metadata), "leaves": _specs(state), "metadata": metadata}
    args = ocp.args.Composite(
      **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
    )
    with deferred_interrupts(), self._writing():  # Ctrl-C waits until orbax has the save in hand
      self._record_finished()
      self._manager.save(step, args=args)
      self._unrecorded.append(step)
      if wait:
        self._record_finished()

  def latest_digest(self) -> str | None:
    """The digest of the newest checkpoint's state and metadata, as recorded when it was saved
    (its files are checked, its state is not read); None if there is no checkpoint.

    Raises:
      CorruptCheckpointError: its files or its record of the digest are damaged.
    """
    step = self.latest_step()
    if step is None:
      return None
    try:
      check_files(self._step_dir(step))
      return self._meta(step)["digest"]
    except Exception as error:  # any failure to read means a broken checkpoint
      reason = _describe(error)
    raise CorruptCheckpointError(f"checkpoint {self._step_dir(step)} is corrupt ({reason})")

  def restore_latest(self, like: Any) -> Any:
    """The newest intact checkpoint restored with the structure, dtypes and shardings of
    ``like``; ``like`` itself if there is none.

    A checkpoint that cannot be read or does not match its digest is renamed to
    ``<step>.corrupt`` (reported in one line) and the next older one is tried; if none is
    intact, CorruptCheckpointError names them and nothing is moved.
    """
    return self.restore_latest_with_metadata(like)[0]

  def restore_latest_with_metadata(self, like: Any) -> tuple[Any, dict | None]:
    """``(state, metadata)`` of the newest intact checkpoint (``metadata`` as given to ``save``);
    ``(like, None)`` if there is none. ``like=None`` reads the state as saved (see ``read``).

    Raises:
      CorruptCheckpointError: there are checkpoints, but none is intact.
      ValueError: the newest checkpoint holds a tree of other paths or shapes than ``like``.
    """
    if self.latest_step() is None:
      return like, None
    return self._newest_intact(lambda step: self._load(step, like))

  def read(self, step: int | None = None) -> Any:
    """Checkpoint ``step`` (default: the newest intact one) as saved, without a target
    structure (a dataclass reads back as a dict).

    Raises:
      FileNotFoundError: there is no such checkpoint.
      CorruptCheckpointError: it (with ``step=None``: every checkpoint) is corrupt.
    """
    if step is None:
      if self.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
      return self._newest_intact(lambda s: self._load(s, None))[0]
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}")
    try:
      return self._load(step, None)[0]
    except Exception as error:  # any failure to read means a broken checkpoint
      reason = _describe(error)
    _collect_orbax_leftovers()
    raise CorruptCheckpointError(f"checkpoint {self._step_dir(step)} is corrupt ({reason})")

  def _meta(self, step: int) -> dict:
    """The ``meta`` item of checkpoint ``step``; raises _Corrupt if it holds no digest."""
    meta = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
    meta = meta[_META]
    if not isinstance(meta, dict) or "digest" not in meta or "leaves" not in meta:
      raise _Corrupt("no digest")
    return meta

  def _load(self, step: int, like: Any) -> tuple[Any, dict | None]:
    """Checkpoint ``step`` (restored like ``like``, or as saved if None), files and digest
    verified."""
    check_files(self._step_dir(step))
    meta = self._meta(step)
    saved = {tuple(path): dtype for path, _, dtype in meta["leaves"]}
    if like is None:
      target = ocp.args.StandardRestore()
    else:
      _check_like(like, meta["leaves"], self._step_dir(step))
      target = ocp.args.StandardRestore(_target(like, saved))
    state = self._manager.restore(step, args=ocp.args.Composite(**{_STATE: target}))[_STATE]
    if tree_digest(state, meta.get("metadata")) != meta["digest"]:
      raise _Corrupt("digest mismatch")
    if like is not None:  # orbax casts to the target's dtype; the digest is over the saved one
      state = jax.tree.map(_cast_like, state, like)
    return state, meta.get("metadata")

  def _newest_intact(self, load: Callable[[int], Any]) -> Any:
    """``load(step)`` of the newest step it succeeds on; moves the corrupt newer ones aside."""
    corrupt = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        result = load(step)
      except _Mismatch:
        raise
      except Exception as error:  # any failure to read means a broken checkpoint
        corrupt.append((step, _describe(error)))
      else:
        break
      _collect_orbax_leftovers()
    else:
      named = "; ".join(f"{self._step_dir(s)} ({reason})" for s, reason in corrupt)
      raise CorruptCheckpointError(
        f"no intact checkpoint in {self.directory}: corrupt {named}; "
        f"delete {self.directory} to retrain this stage"
      )
    for bad, reason in corrupt:
      moved = self._move_aside(bad)
      self._report(
        f"checkpoint {self._step_dir(bad)} is corrupt ({reason}); moved it to {moved.name}, "
        f"resuming from step {step}"
      )
    if corrupt:
      self._manager.reload()
    return result

  def _step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def _move_aside(self, step: int) -> pathlib.Path:
    """Renames checkpoint ``step`` to ``<step>.corrupt`` (or ``.corrupt-N``), out of orbax's view."""
    source = self._step_dir(step)
    target, n = source.with_name(f"{step}.corrupt"), 0
    while target.exists():
      n += 1
      target = source.with_name(f"{step}.corrupt-{n}")
    return source.rename(target)

  def _record_finished(self) -> None:
    """Waits for the pending save, then records the files of each checkpoint saved since the
    last call that orbax has committed (and not yet deleted as one beyond ``max_to_keep``)."""
    self._manager.wait_until_finished()
    for step in self._unrecorded:
      if self._step_dir(step).is_dir():
        record_files(self._step_dir(step))
    self._unrecorded.clear()

  @contextlib.contextmanager
  def _writing(self) -> Iterator[None]:
    """Turns a write the file system refused into StorageError, removing the unfinished
    checkpoint (orbax would remove it on the next start too)."""
    try:
      yield
    except Exception as error:
      reason = storage_reason(error)
      if reason is None:
        raise
      self._unrecorded.clear()
      _remove_temporaries(self.directory)
      _collect_orbax_leftovers()
      raise StorageError(f"cannot write a checkpoint in {self.directory}: {reason}") from error

  def close(self) -> None:
    """Waits for pending writes, records their files and releases the manager."""
    with deferred_interrupts(), self._writing():
      try:
        self._record_finished()
      finally:
        self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
