"""The command line: the stage table, one-line errors with no traceback, the field listing,
and Ctrl-C that stops with one line and leaves a resumable workdir."""

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
    (["--wrkdir=x"], "error: Unknown command line flag 'wrkdir'. Did you mean: workdir ?"),
    (["--fields=maybe"], "error: flag --fields=maybe: "),
    (["stray"], "error: unexpected arguments: ['stray']"),
  ],
)
def test_a_user_error_is_one_line_on_stderr_with_no_traceback(args, message, data_dir, tmp_path):
  out = _cli(*_tiny(data_dir, tmp_path / "w"), *args)
  assert out.returncode == 2
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(message), out.stderr
  assert not (tmp_path / "w").exists()


def test_fields_lists_every_field_with_its_value_and_meaning():
  """Also with an override given before ``--config=``: the order of the flags does not matter."""
  out = _cli("--config.efqat.rho=0.25", "--config=configs/cnn_mnist5k.py", "--fields")
  assert out.returncode == 0, out.stderr
  rho = next(line for line in out.stdout.splitlines() if line.startswith("efqat.rho "))
  assert "0.25" in rho and "trained fraction" in rho
  assert any(line.startswith("ptq.method ") for line in out.stdout.splitlines())


def test_help_prints_the_flags_and_exits_0():
  out = _cli("--help")
  assert out.returncode == 0 and out.stderr == "", out.stderr
  assert "--workdir" in out.stdout and "--config" in out.stdout and "--fields" in out.stdout


def _run_until_a_checkpoint_after(cmd, step_dir, after, sig):
  """Starts ``cmd``, sends ``sig`` once it has saved a checkpoint of a step past ``after``;
  returns ``(status, stderr)``."""
  process = subprocess.Popen(
    cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and process.poll() is None:
    if any(int(p.name) > after for p in step_dir.glob("[0-9]*") if p.name.isdigit()):
      break
    time.sleep(0.1)  # interrupt once training is under way
  process.send_signal(sig)
  _, err = process.communicate(timeout=120)
  return process.returncode, err


def _latest_step(step_dir):
  return max(int(p.name) for p in step_dir.glob("[0-9]*") if p.name.isdigit())


def test_sigterm_and_ctrl_c_stop_with_one_line_and_the_same_command_resumes(data_dir, tmp_path):
  """SIGTERM (schedulers, ``timeout``) stops like Ctrl-C, with status 143; Ctrl-C stops a run
  started with SIGINT ignored (as a shell starts a background job), with status 130."""
  args = [
    *_tiny(data_dir, tmp_path),
    "--config.stages=fp",
    "--config.fp.steps=300",
    "--config.checkpoint_every=10",
  ]
  cmd = [sys.executable, "-m", "efqat_jax.main", *args]
  status, err = _run_until_a_checkpoint_after(cmd, tmp_path / "fp", -1, signal.SIGTERM)
  lines = [line for line in err.splitlines() if line.strip()]
  assert status == 143, err[-3000:]
  assert lines == ["terminated: run the same command again to resume from the workdir"], err
  after = _latest_step(tmp_path / "fp")
  ignoring_sigint = ["sh", "-c", 'trap "" INT; exec "$0" "$@"', *cmd]
  status, err = _run_until_a_checkpoint_after(
    ignoring_sigint, tmp_path / "fp", after, signal.SIGINT
  )
  lines = [line for line in err.splitlines() if line.strip()]
  assert status == 130, err[-3000:]
  assert lines == ["interrupted: run the same command again to resume from the workdir"], err
  assert _latest_step(tmp_path / "fp") > after  # the second run resumed and went on
  out = _cli(*args)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "| fp | accuracy" in out.stdout and "allocator: " in out.stdout


def test_the_stage_table_has_a_line_per_finished_stage(finished):
  table = results_table(finished[2]).splitlines()
  assert table[:2] == ["| stage | metric | wall time (s) |", "|---|---|---|"]
  assert table[2].startswith("| fp | accuracy ")
  assert table[3].startswith("| ptq | accuracy ") and "(rtn: W8A8 x 2, W4A4 x" in table[3]
  assert table[4].startswith("| qat | accuracy ")
  assert table[5].startswith("| efqat | accuracy ") and "(cwpn, rho 0.3:" in table[5]
  assert table[6].startswith("| export | 3 layers from efqat, integer/fake-quant prediction")
