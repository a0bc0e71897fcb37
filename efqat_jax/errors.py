"""Errors that report a user's mistake or a faulty input in one line (the CLI prints no traceback).

Every layer may raise these; this module imports nothing from the package.
"""

from __future__ import annotations

import errno

# What a failed write says when the cause is the file system, not the program (the OS's words).
_STORAGE_REASONS = {
  errno.ENOSPC: "no space left on device",
  errno.EDQUOT: "disk quota exceeded",
  errno.EROFS: "read-only file system",
  errno.EACCES: "permission denied",
  errno.EPERM: "operation not permitted",
}


class UserError(Exception):
  """A problem with the user's config, data or files: its message is one complete line."""


class ConfigError(UserError, ValueError):
  """A config field has a value that is not allowed (the message names the field)."""


class DataError(UserError, ValueError):
  """A dataset is unknown, unprepared, too small for the config, or its files are corrupt."""


class CorruptCheckpointError(UserError):
  """No intact checkpoint is left to restore (the message names the file)."""


class NonFiniteError(UserError, FloatingPointError):
  """Training produced a non-finite loss or parameters (the message names the stage and step)."""


class WorkdirError(UserError):
  """The workdir cannot be used as it is: not a writable directory, in use by another run, or a
  record in it was damaged or changed (the message names the path and what to do)."""


class StorageError(OSError):
  """A file could not be written for a reason outside the program: no space left, a quota, a
  read-only file system (the message names the path). What was written before is intact, and
  the same run resumes once the cause is removed."""


def storage_reason(error: BaseException) -> str | None:
  """The file system's reason (e.g. ``"no space left on device"``) if ``error``, or an error it
  was raised from, is a write that the file system refused; else None. TensorStore reports the
  OS error in its message only, so messages are searched too (for a full or read-only disk)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _STORAGE_REASONS:
      return _STORAGE_REASONS[error.errno]
    text = str(error).lower()
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
      if _STORAGE_REASONS[code] in text:
        return _STORAGE_REASONS[code]
    error = error.__cause__ or error.__context__
  return None
