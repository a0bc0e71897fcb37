"""Errors that report a user's mistake or a faulty input in one line (the CLI prints no traceback).

Every layer may raise these; this module imports nothing from the package.
"""

from __future__ import annotations


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
