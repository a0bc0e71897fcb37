"""Interleaved timing for benchmarks: every variant runs once per round, in turn, so that drift
of the machine (frequency, other load) hits all variants alike; medians over rounds.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import jax

from efqat_jax import allocator as efqat_allocator

RESULTS = pathlib.Path(__file__).parent / "results"


def allocator() -> str:
  """``"jemalloc"`` if this process runs under jemalloc, else ``"default"``."""
  return efqat_allocator.current()


def use_jemalloc() -> None:
  """Restarts this process under jemalloc (retaining freed pages) if it is installed, as the
  command line does (``efqat_jax.allocator``), and prints the allocator in use."""
  efqat_allocator.use_jemalloc()
  print(efqat_allocator.describe(), flush=True)


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
