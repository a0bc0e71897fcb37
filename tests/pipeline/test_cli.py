"""The command line: the stage table, one-line errors with no traceback, the field listing,
and Ctrl-C that stops with one line and leaves a resumable workdir."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from efqat_jax.main import results_table

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _cli(*args, **kwargs):
  cmd = [sys.executable, "-m", "efqat_jax.main", *args]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, **kwargs)


def _tiny(data_dir, workdir):
  return [
    f"--workdir={workdir}",
    f"--config.data_dir={data_dir}",
    "--config.dataset=digits",
    "--config.model_kwargs.features=(4, 8)",
    "--config.model_kwargs.hidden=16",
    "--config.fp.steps=2",
    "--config.efqat.steps=2",
    "--config.stages=fp,ptq,efqat,export",
    "--config.progress=False",
  ]


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["--config.quant.weight_bits=1"],
      "error: config.quant.weight_bits = 1 is not allowed: an integer in 2..16",
    ),
    (
      ["--config.qat.stpes=3"],
      "error: config.qat.stpes is not a config field (did you mean 'qat.steps'",
    ),
    (
      ["--config.efqat.reselect_every=never"],
      "error: config.efqat.reselect_every = 'never' is not allowed: an integer >= 0",
    ),
    (["--config=configs/no_such.py"], "error: --config: configs/no_such.py is not a file"),
    (["--config.dataset=mnist"], "error: config.dataset"),
    (["--config.batch_size=4096"], "error: config.batch_size = 4096 is not allowed"),
    (
      ["--config.model_kwargs.width=3"],
      "error: config.model_kwargs.width is not set in the config",
    ),
  ],
)
def test_a_user_error_is_one_line_on_stderr_with_no_traceback(args, message, data_dir, tmp_path):
  out = _cli(*_tiny(data_dir, tmp_path / "w"), *args)
  assert out.returncode == 2
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(message), out.stderr
  assert not (tmp_path / "w").exists()


def test_fields_lists_every_field_with_its_value_and_meaning():
  out = _cli("--fields", "--config.efqat.rho=0.25")
  assert out.returncode == 0, out.stderr
  rho = next(line for line in out.stdout.splitlines() if line.startswith("efqat.rho "))
  assert "0.25" in rho and "fraction of output channels" in rho
  assert any(line.startswith("ptq.method ") for line in out.stdout.splitlines())


def test_ctrl_c_stops_with_one_line_and_the_same_command_resumes(data_dir, tmp_path):
  args = [
    *_tiny(data_dir, tmp_path),
    "--config.stages=fp",
    "--config.fp.steps=600",
    "--config.checkpoint_every=10",
  ]
  cmd = [sys.executable, "-m", "efqat_jax.main", *args]
  process = subprocess.Popen(
    cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.monotonic() + 120
  while not list((tmp_path / "fp").glob("[0-9]*")) and time.monotonic() < deadline:
    time.sleep(0.2)  # interrupt once training is under way
  os.kill(process.pid, signal.SIGINT)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 130
  lines = [line for line in err.splitlines() if line.strip()]
  assert lines[-1].startswith("interrupted: run the same command again to resume")
  assert "Traceback" not in err
  out = _cli(*args)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "| fp | accuracy" in out.stdout


def test_the_stage_table_has_a_line_per_finished_stage(finished):
  table = results_table(finished[2]).splitlines()
  assert table[:2] == ["| stage | metric | wall time (s) |", "|---|---|---|"]
  assert table[2].startswith("| fp | accuracy ")
  assert table[3].startswith("| ptq | accuracy ") and "(rtn: W8A8 x 2, W4A4 x" in table[3]
  assert table[4].startswith("| qat | accuracy ")
  assert table[5].startswith("| efqat | accuracy ") and "(cwpn, rho 0.3:" in table[5]
  assert table[6].startswith("| export | 3 layers from efqat, integer/fake-quant prediction")
