"""Ctrl-C that is never lost.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives; in a
gc callback (jax has one) or a ``__del__`` it is printed as "Exception ignored" and swallowed, and
the run goes on. Inside ``interrupt_guard()`` every SIGINT is also recorded, and
``raise_if_interrupted()`` raises it again at the next safe point (e.g. once per training step).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_interrupted = False
_deferring = 0  # > 0 inside deferred_interrupts()


def _on_sigint(signum, frame) -> None:
  global _interrupted
  _interrupted = True
  if not _deferring:
    raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
  """Inside, a SIGINT (in an ``interrupt_guard``) is only recorded, and raised when the block
  ends: for work that must not be cut in two, such as handing a checkpoint to orbax's threads."""
  global _deferring
  _deferring += 1
  try:
    yield
  finally:
    _deferring -= 1
  if not _deferring:
    raise_if_interrupted()


@contextlib.contextmanager
def interrupt_guard() -> Iterator[None]:
  """Records every SIGINT while active (and raises KeyboardInterrupt as Python does).

  Takes effect only in the main thread and where SIGINT has Python's default handler (a nested
  guard, an ignored SIGINT or a custom handler is left as it is); the old handler is restored on
  exit, and a record of an interrupt does not outlive the outermost guard.
  """
  global _interrupted
  main = threading.current_thread() is threading.main_thread()
  if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    yield
    return
  _interrupted = False
  signal.signal(signal.SIGINT, _on_sigint)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _interrupted = False


def raise_if_interrupted() -> None:
  """Raises KeyboardInterrupt if a SIGINT arrived (in a guard) since the last one was raised
  here, even if the KeyboardInterrupt it caused was swallowed."""
  global _interrupted
  if _interrupted:
    _interrupted = False
    raise KeyboardInterrupt("interrupted (SIGINT)")
