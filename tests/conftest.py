"""Shared test settings."""

import atexit
import contextlib
import logging
import os
import shutil
import signal
import tempfile

import hypothesis
import jax
import pytest

# Pipeline runs build new but identical programs (train steps, evaluations) in test after test:
# a compilation cache private to this process compiles each once. The subprocesses its tests
# start (the command line, kills, the README and the notebook) inherit it through the
# environment; this process waits for them, so one process at a time writes to it. Each xdist
# worker makes its own: a cache shared by processes that run at once needs JAX's file lock,
# and that lock's bookkeeping made the suite twice as slow. Set before anything compiles.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="efqat_jax_test_cache_")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
_CACHE_SETTINGS = dict(
  jax_compilation_cache_dir=_COMPILATION_CACHE,
  jax_persistent_cache_min_compile_time_secs=0,
  jax_persistent_cache_min_entry_size_bytes=0,
)
for _name, _value in _CACHE_SETTINGS.items():
  jax.config.update(_name, _value)
  os.environ[_name.upper()] = str(_value)

# Compiling, not running, is most of the suite's time (its models are tiny): LLVM's backend
# optimizations off compile about a third faster. XLA's own graph passes (fusion, the programs
# whose operations tests count) are unchanged. Read when the backend starts, here and in every
# subprocess.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

# jit compilation makes first examples slow: no per-example deadline; few examples keep CI short.
hypothesis.settings.register_profile("efqat", deadline=None, max_examples=40, derandomize=True)
hypothesis.settings.load_profile("efqat")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One tfds data dir for the session: each bundled dataset is prepared once."""
  return str(tmp_path_factory.mktemp("tfds"))


def pytest_sessionstart(session):
  """The signal handlers the tests rely on, however the run was started: a shell without job
  control starts a background job (``cmd &``) with SIGINT ignored, and every child inherits an
  ignored signal. Here (and in each xdist worker) Ctrl-C raises KeyboardInterrupt, as the
  interrupt tests' real SIGINTs expect; the subprocesses tests start get the default SIGINT
  and SIGTERM back."""
  signal.signal(signal.SIGINT, signal.default_int_handler)
  if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _Compilations(logging.Handler):
  """Counts the programs JAX compiles for one function name while attached."""

  def __init__(self, name: str):
    super().__init__(logging.WARNING)
    self.prefix, self.count = f"Compiling jit({name})", 0

  def emit(self, record):
    self.count += record.getMessage().startswith(self.prefix)


@pytest.fixture
def compilations():
  """``with compilations("observe") as counted: ...``; then ``counted.count`` is how many
  programs JAX compiled for functions of that name inside (``jax.log_compiles``)."""

  @contextlib.contextmanager
  def count(name: str):
    handler = _Compilations(name)
    logger = logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(handler)
    try:
      with jax.log_compiles():
        yield handler
    finally:
      logger.removeHandler(handler)

  return count
