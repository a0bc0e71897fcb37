"""Faults met from the command line end in one line on stderr, never a traceback: an unusable
workdir, a full disk, a second run on a busy workdir, a checkpoint with a file missing, a
damaged results.json. Each leaves a workdir that the same command finishes once the cause is gone.
"""

import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess

import pytest

from efqat_jax import pipeline
from efqat_jax.errors import StorageError, WorkdirError
from efqat_jax.pipeline import workdir as workdir_lib
from efqat_jax.pipeline.outputs import write_atomic
from tests.pipeline.conftest import faults_config
from tests.pipeline.test_cli import _cli


def _lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.strip()]


def _config_file(tmp_path: pathlib.Path, data_dir: str, **overrides) -> str:
  """A config file for the CLI with the ``finished`` fixture's config (``faults_config``)."""
  path = tmp_path / "faults_config.py"
  path.write_text(
    "from tests.pipeline.conftest import faults_config\n\n\n"
    f"def get_config():\n  return faults_config({data_dir!r}, **{overrides!r})\n"
  )
  return f"--config={path}"


def _copy(finished, tmp_path) -> pathlib.Path:
  shutil.copytree(finished[1], tmp_path / "w")
  return tmp_path / "w"


def _one_error_line(out: subprocess.CompletedProcess, status: int) -> str:
  lines = _lines(out.stderr)
  assert out.returncode == status and len(lines) == 1, (out.returncode, out.stderr[-3000:])
  assert lines[0].startswith("error: "), lines[0]
  return lines[0]


@contextlib.contextmanager
def _tmpfs(path: pathlib.Path, options: str):
  """A tmpfs mounted at ``path`` (root only: a real full or read-only file system)."""
  path.mkdir()
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root")
  mounted = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
  )
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def _read_only_dir(path: pathlib.Path):
  """A directory nobody may write in: a read-only mount for root, else mode 0555 (None where
  root cannot mount one)."""
  if os.geteuid() == 0:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(path)])
    try:
      yield None if mounted.returncode else path
    finally:
      if not mounted.returncode:
        subprocess.run(["umount", "-l", str(path)], check=True)
    return
  path.mkdir()
  path.chmod(0o555)
  try:
    yield path
  finally:
    path.chmod(0o755)


def test_an_unusable_workdir_is_one_line_naming_it_before_any_file(data_dir, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  line = _one_error_line(_cli(_config_file(tmp_path, data_dir), f"--workdir={a_file}"), 2)
  assert line.startswith(f"error: --workdir {a_file}") and "not a directory" in line
  assert a_file.read_text() == "not a directory"

  config = faults_config(data_dir)
  with _read_only_dir(tmp_path / "ro") as read_only:
    unusable = [a_file / "w"]
    unusable += [pathlib.Path("/proc/efqat_x")] if pathlib.Path("/proc").is_dir() else []
    unusable += [read_only, read_only / "w"] if read_only is not None else []
    for workdir in unusable:
      with pytest.raises(WorkdirError, match=f"^--workdir {workdir}") as error:
        pipeline.prepare(config, workdir)
      assert "\n" not in str(error.value)
    assert read_only is None or list(read_only.iterdir()) == []


def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_space(
  finished, data_dir, tmp_path
):
  """The disk fills during a checkpoint of fp: one line naming the checkpoint directory; with
  space again the same command clears what was left unfinished and finishes with the result of
  an uninterrupted run."""
  args = [_config_file(tmp_path, data_dir, stages="fp")]
  with _tmpfs(tmp_path / "disk", "size=100k") as disk:
    workdir = disk / "w"
    line = _one_error_line(_cli(*args, f"--workdir={workdir}"), 1)
    assert line.startswith(f"error: cannot write a checkpoint in {workdir / 'fp'}: no space left")
    with pytest.raises(StorageError, match="no space left on device") as error:
      write_atomic(workdir / "big.bin", bytes(1 << 20))
    assert str(workdir / "big.bin") in str(error.value)
    assert [p.name for p in workdir.iterdir() if "big.bin" in p.name] == []  # no partial file

    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    out = _cli(*args, f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert not [p for p in workdir.rglob("*") if "tmp" in p.name or "partial" in p.name]
    results = json.loads((workdir / "results.json").read_text())
  assert results["fp"]["accuracy"] == finished[2]["fp"]["accuracy"]
  assert results["fp"]["checkpoint_digest"] == finished[2]["fp"]["checkpoint_digest"]


def test_a_second_run_on_a_busy_workdir_refuses_naming_the_holder(finished, data_dir, tmp_path):
  workdir = _copy(finished, tmp_path)
  before = (workdir / "results.json").read_bytes()
  with workdir_lib.hold(workdir):
    line = _one_error_line(_cli(_config_file(tmp_path, data_dir), f"--workdir={workdir}"), 2)
  assert line.startswith(f"error: --workdir {workdir} is in use by another run"), line
  assert f"pid {os.getpid()} on {socket.gethostname()}" in line
  assert (workdir / "results.json").read_bytes() == before
  with workdir_lib.hold(workdir):  # released when its holder ends
    pass


def test_a_checkpoint_missing_its_manifest_is_one_line_with_no_orbax_noise(
  finished, data_dir, tmp_path
):
  workdir = _copy(finished, tmp_path)
  (workdir / "ptq" / "0" / "state" / "manifest.ocdbt").unlink()
  results = json.loads((workdir / "results.json").read_text())
  del results["qat"]  # qat runs again: it needs the ptq model
  (workdir / "results.json").write_text(json.dumps(results))
  shutil.rmtree(workdir / "qat")
  line = _one_error_line(_cli(_config_file(tmp_path, data_dir), f"--workdir={workdir}"), 2)
  assert line.startswith(f"error: no intact checkpoint in {workdir / 'ptq'}"), line
  assert "state/manifest.ocdbt is missing" in line


def test_a_garbled_results_file_is_one_line_naming_it(finished, data_dir, tmp_path):
  workdir = _copy(finished, tmp_path)
  path = workdir / "results.json"
  data = bytearray(path.read_bytes())
  data[40:60] = bytes(range(200, 220))  # not UTF-8
  path.write_bytes(bytes(data))
  line = _one_error_line(_cli(_config_file(tmp_path, data_dir), f"--workdir={workdir}"), 2)
  assert line.startswith(f"error: {path} is damaged"), line
  assert path.read_bytes() == bytes(data)  # left for the user to see
