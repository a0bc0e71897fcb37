"""The workdir: usable before anything is written there, and held by one run at a time.

A run holds an advisory lock on ``<workdir>/.lock`` (``flock``) while it writes; the lock file
names the holder. The operating system releases the lock when its process ends, however it
ends, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import socket
import tempfile
from collections.abc import Iterator

from efqat_jax.errors import StorageError, WorkdirError, storage_reason

LOCK = ".lock"


def check_usable(workdir: str | pathlib.Path) -> None:
  """Raises WorkdirError unless ``workdir`` is a directory this process can write in, or one
  it can create. Probes by creating and removing an empty directory: nothing is left."""
  if str(workdir) == "":
    raise WorkdirError("--workdir is empty: give the directory for the run's files")
  path = pathlib.Path(workdir).absolute()
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"--workdir {path} is a file, not a directory")
  existing = path
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise WorkdirError(f"--workdir {path}: {existing} is a file, not a directory")
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".efqat-probe-", dir=existing))
  except OSError as error:
    where = "it" if existing == path else existing
    raise WorkdirError(
      f"--workdir {path}: cannot write in {where} ({error.strerror or error})"
    ) from None


def _holder(fd: int) -> str:
  """Who holds the lock, as its file says."""
  try:
    holder = json.loads(os.pread(fd, 4096, 0))
    return f"pid {holder['pid']} on {holder['host']}"
  except (ValueError, KeyError, TypeError, OSError):
    return "its pid is not recorded yet"


@contextlib.contextmanager
def hold(workdir: str | pathlib.Path) -> Iterator[None]:
  """Creates ``workdir`` if needed and holds its lock while the block runs.

  Raises:
    WorkdirError: another process holds it (the message names its pid and host).
    StorageError: the lock file cannot be written (e.g. no space left).
  """
  workdir = pathlib.Path(workdir).absolute()
  path = workdir / LOCK
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as error:
    reason = storage_reason(error)
    if reason is None:
      raise
    raise StorageError(f"cannot write {path}: {reason}") from error
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirError(
        f"--workdir {workdir} is in use by another run ({_holder(fd)}); wait for it to end,"
        " or give another --workdir"
      ) from None
    holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, holder, 0)
    except OSError as error:
      reason = storage_reason(error)
      if reason is None:
        raise
      raise StorageError(f"cannot write {path}: {reason}") from error
    yield
  finally:
    os.close(fd)  # releases the lock
