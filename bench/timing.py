"""Interleaved timing for benchmarks: every variant runs once per round, in turn, so that drift
of the machine (frequency, other load) hits all variants alike; medians over rounds.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax

RESULTS = pathlib.Path(__file__).parent / "results"
JEMALLOC_PATHS = (
  "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
)


def allocator() -> str:
  """``"jemalloc"`` if this process runs under jemalloc, else ``"default"``."""
  return "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "default"


def use_jemalloc() -> None:
  """Restarts this process under jemalloc (retaining freed pages) if it is installed.

  XLA:CPU allocates a step's temporaries afresh on every call; with glibc's malloc, buffers over
  its mmap threshold come back as fresh pages each step, and the page faults can cost more than
  the arithmetic (measured on this project's 2-core CPU machine). jemalloc with decay off keeps them.
  """
  if allocator() == "jemalloc":
    return
  path = next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)
  if path is None:
    print("jemalloc not found (apt-get install libjemalloc2): timing with the default allocator")
    return
  env = dict(os.environ, LD_PRELOAD=path, MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
  os.execve(sys.executable, [sys.executable, *sys.argv], env)


def stepping_call(step, state, *args) -> Callable[[], None]:
  """A call of ``step(state, *args) -> (state, metrics)`` that carries its state on from call to
  call (so a donating step is fed live buffers) and blocks until the metrics are ready."""
  holder = [state]

  def call():
    holder[0], metrics = step(holder[0], *args)
    jax.block_until_ready(metrics)

  return call


def interleaved_ms(
  steps: dict[str, Callable[[], object]], rounds: int, warmup: int = 3
) -> dict[str, list[float]]:
  """Milliseconds of each ``steps[name]()`` (which must block until done), per round."""
  for _ in range(warmup):
    for step in steps.values():
      step()
  times: dict[str, list[float]] = {name: [] for name in steps}
  for _ in range(rounds):
    for name, step in steps.items():
      start = time.perf_counter()
      step()
      times[name].append((time.perf_counter() - start) * 1e3)
  return times


def median(values: list[float]) -> float:
  return statistics.median(values)


def machine() -> dict[str, object]:
  """Where the figures were measured."""
  return {
    "devices": ", ".join(str(d) for d in jax.devices()),
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
    "python": platform.python_version(),
    "allocator": allocator(),
  }


def write_rows(name: str, rows: list[dict]) -> pathlib.Path:
  """Writes ``bench/results/<name>.json`` (a list of flat row objects) and returns its path."""
  RESULTS.mkdir(exist_ok=True)
  path = RESULTS / f"{name}.json"
  path.write_text(json.dumps(rows, indent=1) + "\n")
  return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
  return "\n".join(lines)
