"""The memory allocator a run uses: jemalloc when it is installed, else the C library's.

XLA:CPU allocates a step's temporaries afresh on every call. With glibc's malloc, buffers above
its mmap threshold go back to the system when freed and come back as fresh pages on the next
step, and on a small CPU machine the page faults can cost more than the arithmetic (the
benchmarks in ``bench/`` measure both allocators). jemalloc with its decay off keeps freed
pages. GPUs and TPUs allocate device memory through XLA's own allocator, so there this changes
host overhead only.

The command line (``python -m efqat_jax.main``) and the benchmarks call ``use_jemalloc`` first:
it restarts the process under jemalloc (``LD_PRELOAD``) when the library is found and the
process is not under it yet. ``EFQAT_JAX_ALLOCATOR=default`` keeps the C library's allocator.
Install jemalloc with ``apt-get install libjemalloc2`` (Debian, Ubuntu) or ``conda install
jemalloc``, or point ``EFQAT_JAX_JEMALLOC`` at its ``libjemalloc.so.2``.
"""

from __future__ import annotations

import glob
import os
import sys

ENV_CHOICE = "EFQAT_JAX_ALLOCATOR"  # "default": never restart under jemalloc
ENV_PATH = "EFQAT_JAX_JEMALLOC"  # an explicit libjemalloc.so.2
NO_DECAY = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # keep freed pages: no faults next step
SEARCHED = (
  "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
  "/usr/lib64/libjemalloc.so.2",
  "/usr/local/lib/libjemalloc.so.2",
)


def current() -> str:
  """``"jemalloc"`` if this process runs under jemalloc, else ``"default"``."""
  return "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "default"


def find_jemalloc() -> str | None:
  """The path of an installed jemalloc shared library, or None."""
  explicit = os.environ.get(ENV_PATH)
  if explicit:
    return explicit if os.path.exists(explicit) else None
  prefix = os.environ.get("CONDA_PREFIX")
  candidates = [*SEARCHED, *(glob.glob(f"{prefix}/lib/libjemalloc.so*") if prefix else [])]
  return next((path for path in candidates if os.path.exists(path)), None)


def use_jemalloc(argv: list[str] | None = None) -> str:
  """Restarts this process under jemalloc if it is installed, not in use yet and not declined
  (``EFQAT_JAX_ALLOCATOR=default``); returns the allocator in use when it does not restart.

  Args:
    argv: the command line to restart with, after the interpreter; default: this process's own
      (``sys.orig_argv``, so ``python -m module`` restarts as such).
  """
  if current() == "jemalloc" or os.environ.get(ENV_CHOICE) == "default":
    return current()
  path = find_jemalloc()
  if path is None:
    return current()
  preload = " ".join(p for p in (path, os.environ.get("LD_PRELOAD", "")) if p)
  env = dict(os.environ, LD_PRELOAD=preload, MALLOC_CONF=os.environ.get("MALLOC_CONF", NO_DECAY))
  args = argv if argv is not None else sys.orig_argv[1:]
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *args], env)
  except OSError:
    return current()  # could not restart: carry on as we are
  raise AssertionError("unreachable")  # pragma: no cover


def describe() -> str:
  """One line naming the allocator in use, and how to get jemalloc where it is missing."""
  if current() == "jemalloc":
    return "allocator: jemalloc"
  if os.environ.get(ENV_CHOICE) == "default":
    return f"allocator: the C library's ({ENV_CHOICE}=default)"
  return (
    "allocator: the C library's (jemalloc not found; CPU steps can be slower: apt-get install"
    " libjemalloc2)"
  )
