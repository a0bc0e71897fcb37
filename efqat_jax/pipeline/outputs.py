"""Output files written atomically: a reader (or a rerun after a kill) sees the old file or the
new one, never a partial one."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from efqat_jax.errors import NonFiniteError, StorageError, storage_reason


def write_atomic(path: pathlib.Path, data: bytes) -> None:
  """Writes ``data`` to a temporary file next to ``path`` (named by this process), syncs it,
  then renames it over.

  Raises:
    StorageError: the file system refused the write (e.g. no space left); ``path`` is as it
      was and no temporary file is left.
  """
  partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(partial, path)
  except OSError as error:
    partial.unlink(missing_ok=True)
    reason = storage_reason(error)
    if reason is None:
      raise
    raise StorageError(f"cannot write {path}: {reason}") from error


def remove_partials(directory: pathlib.Path) -> None:
  """Deletes the temporary files that killed writers left in ``directory`` and the folders in
  it (call it only while no other process writes there)."""
  for partial in [*directory.glob(".*.partial"), *directory.glob("*/.*.partial")]:
    partial.unlink(missing_ok=True)


def check_finite(values: Mapping[str, Any], what: str) -> None:
  """Raises NonFiniteError naming ``what`` and the key if a number in ``values`` is NaN or
  infinite (nested mappings are searched too)."""
  for key, value in values.items():
    if isinstance(value, Mapping):
      check_finite(value, f"{what}, {key}")
    elif isinstance(value, float) and not math.isfinite(value):
      raise NonFiniteError(f"{what}: {key} is {value}, not a finite number")


def json_text(value: Any) -> str:
  """Strict JSON (no NaN / Infinity tokens)."""
  return json.dumps(value, indent=1, allow_nan=False) + "\n"


def write_json(path: pathlib.Path, value: Any) -> None:
  write_atomic(path, json_text(value).encode())


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()
