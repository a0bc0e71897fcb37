"""The process restarts itself under jemalloc where it is found, once, keeping its arguments."""

import os
import pathlib
import subprocess
import sys

import pytest

from efqat_jax import allocator

CHILD = (
  "import os, sys; from efqat_jax import allocator;"
  " print(allocator.use_jemalloc(), os.environ.get('LD_PRELOAD', ''),"
  " os.environ.get('MALLOC_CONF', ''), sys.argv[1:], sep='|')"
)


def _run(env_extra: dict[str, str]) -> list[str]:
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
  env.pop(allocator.ENV_CHOICE, None)
  out = subprocess.run(
    [sys.executable, "-c", CHILD, "--flag=1"],
    env={**env, **env_extra},
    capture_output=True,
    text=True,
    check=True,
  )
  return out.stdout.strip().split("|")


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> pathlib.Path:
  """The C library (loaded in every process, so preloading it again is harmless) under
  jemalloc's file name: what is preloaded is then checked without jemalloc installed."""
  maps = pathlib.Path("/proc/self/maps").read_text().split()
  libc = next(word for word in maps if "/libc.so" in word or "/libc-" in word)
  link = tmp_path_factory.mktemp("lib") / "libjemalloc.so.2"
  link.symlink_to(libc)
  return link


def test_restarts_under_jemalloc_once_with_its_arguments_and_no_decay(stand_in):
  used, preload, conf, argv = _run({allocator.ENV_PATH: str(stand_in)})
  assert (used, preload, conf) == ("jemalloc", str(stand_in), allocator.NO_DECAY)
  assert argv == "['--flag=1']"


def test_declined_or_missing_jemalloc_keeps_the_default(stand_in, tmp_path):
  declined = {allocator.ENV_PATH: str(stand_in), allocator.ENV_CHOICE: "default"}
  assert _run(declined)[:2] == ["default", ""]
  assert _run({allocator.ENV_PATH: str(tmp_path / "missing.so")})[:2] == ["default", ""]
  assert "EFQAT_JAX_ALLOCATOR=default" in _describe_declined()


def _describe_declined() -> str:
  env = {**os.environ, allocator.ENV_CHOICE: "default"}
  env.pop("LD_PRELOAD", None)
  code = "from efqat_jax import allocator; print(allocator.describe())"
  return subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True
  ).stdout


def test_the_command_line_module_imports_no_jax_before_its_restart():
  """``python -m efqat_jax.main`` restarts before its heavy imports, so the restart costs no
  second import of JAX; every name the package exports still resolves on first use."""
  code = (
    "import sys, efqat_jax, efqat_jax.main; heavy = 'jax' in sys.modules;"
    " names = [getattr(efqat_jax, n) for n in efqat_jax.__all__]; print(heavy, 'jax' in sys.modules)"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["False", "True"], out.stderr
