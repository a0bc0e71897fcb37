"""Shared test settings."""

import atexit
import os
import shutil
import tempfile

import hypothesis
import jax
import pytest

# Pipeline runs build new but identical programs (train steps, evaluations) in test after test:
# one compilation cache for the run compiles each once. The first process of the run (pytest, or
# the pytest-xdist controller) makes it and removes it at exit; the xdist workers and the
# subprocesses that tests start (command line, kills, the notebook) inherit it through the
# environment. A size limit turns on its file lock, which keeps concurrent writes whole.
if "EFQAT_JAX_TEST_CACHE" not in os.environ:
  os.environ["EFQAT_JAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="efqat_jax_test_cache_")
  atexit.register(shutil.rmtree, os.environ["EFQAT_JAX_TEST_CACHE"], ignore_errors=True)
_CACHE_SETTINGS = dict(
  jax_compilation_cache_dir=os.environ["EFQAT_JAX_TEST_CACHE"],
  jax_compilation_cache_max_size=8 << 30,
  jax_persistent_cache_min_compile_time_secs=0,
  jax_persistent_cache_min_entry_size_bytes=0,
)
for _name, _value in _CACHE_SETTINGS.items():  # this process, before anything compiles; children
  jax.config.update(_name, _value)
  os.environ[_name.upper()] = str(_value)

# jit compilation makes first examples slow: no per-example deadline; few examples keep CI short.
hypothesis.settings.register_profile("efqat", deadline=None, max_examples=40, derandomize=True)
hypothesis.settings.load_profile("efqat")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One tfds data dir for the session: each bundled dataset is prepared once."""
  return str(tmp_path_factory.mktemp("tfds"))
