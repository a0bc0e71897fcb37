"""Ctrl-C and SIGTERM that are never lost.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives; in a
gc callback (jax has one) or a ``__del__`` it is printed as "Exception ignored" and swallowed, and
the run goes on. Inside ``interrupt_guard()`` every such signal is also recorded, and
``raise_if_interrupted()`` raises it again at the next safe point (e.g. once per training step).
A program's entry point may hand SIGTERM (what schedulers and ``timeout`` send) the same way with
``stop_on_signals``, so that it stops as on Ctrl-C, with its checkpoints closed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_interrupted = 0  # the number of the signal recorded, 0 for none
_deferring = 0  # > 0 inside deferred_interrupts()


class Interrupted(KeyboardInterrupt):
  """A stop asked for by signal ``signum`` (SIGINT, or SIGTERM where that is handled too)."""

  def __init__(self, signum: int):
    super().__init__(f"interrupted ({signal.Signals(signum).name})")
    self.signum = signum


def _on_signal(signum, frame) -> None:
  global _interrupted
  _interrupted = signum
  if not _deferring:
    raise Interrupted(signum)


def _is_default(signum: int) -> bool:
  handler = signal.getsignal(signum)
  return handler is (signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)


def stop_on_signals(*signums: int) -> None:
  """From now on, each of ``signums`` raises Interrupted (recorded as in a guard) instead of its
  previous action, even if it was inherited as ignored (a shell starts a background job with
  SIGINT ignored). For a program's entry point, in the main thread; guards then leave them."""
  for signum in signums:
    signal.signal(signum, _on_signal)


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
def interrupt_guard(*signums: int) -> Iterator[None]:
  """Records every one of ``signums`` (default: SIGINT) while active, raising Interrupted (a
  KeyboardInterrupt) as Python does for SIGINT.

  Takes effect only in the main thread and for a signal with Python's default handler (a nested
  guard, an ignored signal or a custom handler is left as it is); the old handlers are restored
  on exit, and a record of an interrupt does not outlive the outermost guard.
  """
  global _interrupted
  signums = signums or (signal.SIGINT,)
  main = threading.current_thread() is threading.main_thread()
  taken = [s for s in signums if _is_default(s)] if main else []
  if not taken:
    yield
    return
  old = {s: signal.getsignal(s) for s in taken}
  _interrupted = 0
  stop_on_signals(*taken)
  try:
    yield
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)
    _interrupted = 0


def raise_if_interrupted() -> None:
  """Raises Interrupted if a handled signal arrived since the last one was raised here, even if
  the KeyboardInterrupt it caused was swallowed."""
  global _interrupted
  if _interrupted:
    signum, _interrupted = _interrupted, 0
    raise Interrupted(signum)
