"""The record of a checkpoint's files: the sha256 of each, written once orbax has committed it,
and checked before orbax reads the checkpoint, so that a checkpoint with a file missing or
changed is found corrupt without orbax ever starting on it."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

FILE_RECORD = "efqat_files.json"  # in each checkpoint: {"files": {relative path: sha256}}


class FilesChanged(Exception):
  """A file the record lists is missing or changed, or the record itself is damaged."""


def file_digests(step_dir: pathlib.Path) -> dict[str, str]:
  """sha256 of every file of a checkpoint, by path relative to it (the record itself aside)."""
  digests = {}
  for path in sorted(step_dir.rglob("*")):
    if path.is_file() and path.name != FILE_RECORD:
      with open(path, "rb") as f:
        digests[str(path.relative_to(step_dir))] = hashlib.file_digest(f, "sha256").hexdigest()
  return digests


def record_files(step_dir: pathlib.Path) -> None:
  """Writes ``FILE_RECORD`` into a committed checkpoint (atomically)."""
  data = json.dumps({"files": file_digests(step_dir)}, indent=1).encode()
  partial = step_dir / f".{FILE_RECORD}.{os.getpid()}.partial"
  try:
    with open(partial, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(partial, step_dir / FILE_RECORD)
  finally:
    partial.unlink(missing_ok=True)


def check_files(step_dir: pathlib.Path) -> None:
  """Raises FilesChanged if a file ``FILE_RECORD`` lists is missing or changed. A checkpoint without
  the record (its run was killed before writing it) is left to the digest check."""
  record = step_dir / FILE_RECORD
  if not record.exists():
    return
  try:
    saved = dict(json.loads(record.read_bytes())["files"])
  except (ValueError, KeyError, TypeError):
    raise FilesChanged(f"its record {FILE_RECORD} is damaged") from None
  digests = file_digests(step_dir)
  for name, digest in saved.items():
    if name not in digests:
      raise FilesChanged(f"file {name} is missing")
    if digests[name] != digest:
      raise FilesChanged(f"file {name} differs from the one saved")
