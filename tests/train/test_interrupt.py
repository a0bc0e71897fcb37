"""Ctrl-C (a real SIGINT) is never lost, even when Python swallows its KeyboardInterrupt."""

import contextlib
import gc
import itertools
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import optax
import pytest

from efqat_jax.train import (
  Checkpointer,
  Interrupted,
  MetricWriter,
  create_train_state,
  interrupt_guard,
  raise_if_interrupted,
  train_loop,
)


def _sigint():
  """Sends SIGINT to this process and waits for its handler to run."""
  os.kill(os.getpid(), signal.SIGINT)
  for _ in range(100):
    time.sleep(0.01)
  raise AssertionError("SIGINT was not delivered")


def test_sigint_in_the_guard_raises_and_the_old_handler_comes_back():
  old = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt), interrupt_guard():
    assert signal.getsignal(signal.SIGINT) is not old
    with interrupt_guard():  # nested: the outer guard's handler stays
      _sigint()
  assert signal.getsignal(signal.SIGINT) is old
  raise_if_interrupted()  # the record does not outlive the guard


def test_an_interrupt_swallowed_in_a_gc_callback_is_raised_at_the_next_check(monkeypatch):
  swallowed = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_type))
  calls = itertools.count()
  callback = lambda phase, info: _sigint() if next(calls) == 0 else None
  with interrupt_guard():
    gc.callbacks.append(callback)
    try:
      gc.collect()  # KeyboardInterrupt is raised in the callback, printed and dropped
    finally:
      gc.callbacks.remove(callback)
    assert len(swallowed) == 1 and issubclass(swallowed[0], KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
      raise_if_interrupted()
    raise_if_interrupted()  # raised once


def test_sigterm_in_a_guard_that_takes_it_raises_an_interrupt_naming_it():
  old = signal.getsignal(signal.SIGTERM)
  with pytest.raises(Interrupted) as stopped, interrupt_guard(signal.SIGINT, signal.SIGTERM):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1)
  assert stopped.value.signum == signal.SIGTERM and isinstance(stopped.value, KeyboardInterrupt)
  assert signal.getsignal(signal.SIGTERM) is old


def test_the_guard_does_nothing_outside_the_main_thread():
  seen = []

  def run():
    with interrupt_guard():
      seen.append(signal.getsignal(signal.SIGINT))

  thread = threading.Thread(target=run)
  thread.start()
  thread.join()
  assert seen == [signal.default_int_handler]


def test_train_loop_stops_before_the_step_after_a_swallowed_interrupt(tmp_path):
  steps = []

  def step_fn(state, batch, rng):
    steps.append(int(state.step))
    if int(state.step) == 2:
      with contextlib.suppress(KeyboardInterrupt):  # swallowed, as in a gc callback
        _sigint()
    return state.replace(step=state.step + 1), {"loss": jnp.float32(0.0)}

  state = create_train_state({"params": {"w": jnp.zeros(2)}}, optax.identity())
  with (
    Checkpointer(tmp_path / "ckpt") as ckpt,
    MetricWriter(tmp_path / "tb") as writer,
    pytest.raises(KeyboardInterrupt),
  ):
    train_loop(
      state,
      step_fn,
      lambda start: itertools.repeat(None),
      10,
      checkpointer=ckpt,
      writer=writer,
      rng=jax.random.key(0),
      progress=False,
    )
  assert steps == [0, 1, 2]


def test_an_interrupt_inside_a_deferred_block_is_raised_when_the_block_ends():
  from efqat_jax.train.interrupt import deferred_interrupts

  done = []
  with pytest.raises(KeyboardInterrupt), interrupt_guard(), deferred_interrupts():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs here: it only records
    done.append("finished")
  assert done == ["finished"]
