"""Command line: ``python -m efqat_jax.main --config=configs/<name>.py --workdir=<dir>``.

Runs the configured stages (fp, ptq, qat, efqat, export), resuming from the workdir, and prints
one table of metric and wall time per stage (also in ``<workdir>/results.json``). With no flags
it runs ``configs/cnn_mnist5k.py`` in ``./workdir``. Override a field with
``--config.<field>=<value>``; ``--fields`` lists every field with its value and meaning.

A user's mistake (a bad flag or value, a typo'd field, a dataset that does not fit, a workdir
that cannot be written or is in use by another run) is one line on stderr and exit status 2,
before any file is written. A write the file system refuses (no space left, a read-only disk)
is one line and status 1. Ctrl-C stops with one line (status 130), SIGTERM likewise (status
143); each leaves a workdir that the same command resumes. The command restarts itself under
jemalloc where it is installed (``efqat_jax.allocator``; ``EFQAT_JAX_ALLOCATOR=default`` opts
out) and names the allocator under its table.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from efqat_jax import allocator, fields
from efqat_jax.errors import ConfigError, StorageError, UserError, storage_reason

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "cnn_mnist5k.py"

FLAGS = {}


def define_flags() -> None:
  """The flags (defined after ``check_command_line``: absl parses overrides as it defines them)."""
  FLAGS["config"] = config_flags.DEFINE_config_file(
    "config", str(DEFAULT_CONFIG), "Experiment config file."
  )
  FLAGS["workdir"] = flags.DEFINE_string(
    "workdir", "workdir", "Checkpoints, logs and results go here."
  )
  FLAGS["fields"] = flags.DEFINE_bool(
    "fields", False, "Print every config field (value, meaning) and exit."
  )


def results_table(results: dict) -> str:
  """The stage table: metric and wall time of each finished stage."""
  lines = ["| stage | metric | wall time (s) |", "|---|---|---|"]
  for stage, result in results.items():
    if "bits_per_char" in result:
      metric = f"loss {result['loss']:.4f}, {result['bits_per_char']:.4f} bits/char"
    elif "accuracy" in result:
      metric = f"accuracy {100 * result['accuracy']:.2f}%"
    else:
      metric = (
        f"{result['layers']} layers from {result['source']}, integer/fake-quant prediction"
        f" agreement {100 * result['prediction_agreement']:.1f}%, max accumulator"
        f" {result['max_accumulator']}"
      )
    if "formats" in result:  # ptq
      metric += f" ({result['method']}: {result['formats']})"
    if result.get("accumulator_needed_bits"):  # ptq, export
      metric += f"; accumulators need {result['accumulator_needed_bits']} bits"
      if result.get("overflow_free") and not result.get("zeroed_layers"):
        metric += ", overflow-free as promised"
    if result.get("zeroed_layers"):  # ptq, only with allow_zeroed_layers = True
      metric += f"; all weights zero in {', '.join(result['zeroed_layers'])}"
    if "mode" in result:  # efqat
      work = result.get("work_fraction")  # results written before it was recorded lack it
      metric += (
        f" ({result['mode']}, rho {result['rho']:g}: {100 * result['param_fraction']:.1f}% of"
        " kernel params trained"
        + ("" if work is None else f", {100 * work:.1f}% of their gradient work")
        + ")"
      )
    lines.append(f"| {stage} | {metric} | {result['wall_time_s']:.1f} |")
  return "\n".join(lines)


def _flag_values(argv: list[str], name: str) -> list[tuple[str, str | None]]:
  """``(flag, value)`` of every ``--name...`` argument (``=value`` or the next argument)."""
  found = []
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}"):
      flag, eq, value = arg[2:].partition("=")
      if not eq:
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
      found.append((flag, value))
  return found


def _load_config_file(spec: str):
  path = pathlib.Path(spec.split(":")[0])
  if not path.is_file():
    raise ConfigError(f"--config: {path} is not a file (a config file defines get_config())")
  module_spec = importlib.util.spec_from_file_location("efqat_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config: {path} defines no get_config()")
  return module.get_config()


def _parses_as(default, raw: str) -> bool:
  if isinstance(default, bool):
    return raw.lower() in ("true", "false", "1", "0")
  for kind in (int, float):
    if isinstance(default, kind):
      try:
        kind(raw)
      except ValueError:
        return False
  return True


def _has_key(config, dotted: str) -> bool:
  for part in dotted.split("."):
    if part not in config:
      return False
    config = config[part]
  return True


def check_command_line(argv: list[str]) -> None:
  """The config file exists and every ``--config.<field>`` names a field and parses as its
  type (absl would report these with a traceback)."""
  from efqat_jax.pipeline import pipeline_schema

  specs = [v for f, v in _flag_values(argv, "config") if f == "config"]
  config = _load_config_file(specs[-1] if specs and specs[-1] else str(DEFAULT_CONFIG))
  schema = pipeline_schema()
  for flag, raw in _flag_values(argv, "config."):
    dotted = flag.removeprefix("config.")
    item = fields.lookup(schema, dotted)
    under_free = any(
      isinstance(f, fields.Field) and f.free and dotted.startswith(n + ".")
      for n, f in fields.walk(schema)
    )
    if item is None and not under_free:
      raise fields.unknown_field_error(dotted, schema)
    if under_free and not _has_key(config, dotted):
      raise ConfigError(
        f"config.{dotted} is not set in the config file; an override can only change a key the"
        " file sets (add it to the file's get_config())"
      )
    if isinstance(item, fields.Field) and raw is not None:
      default = config
      for part in dotted.split("."):
        default = default[part]
      if not _parses_as(default, raw):
        raise ConfigError(f"config.{dotted} = {raw!r} is not allowed: {item.check.allowed}")


def _config_first(argv: list[str]) -> list[str]:
  """``argv`` with the ``--config`` file flag first: absl takes a ``--config.<field>``
  override only after the file it overrides."""
  config, rest, i = [], [], 1
  while i < len(argv):
    if argv[i] == "--config" and i + 1 < len(argv):
      config += argv[i : i + 2]
      i += 2
      continue
    (config if argv[i].startswith("--config=") else rest).append(argv[i])
    i += 1
  return argv[:1] + config + rest


HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parse, with a bad flag or a stray argument as ConfigError (absl prints two lines and
  exits with status 1)."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    raise ConfigError(f"{' '.join(str(e).split())} (see --help)") from None
  if len(rest) > 1:
    raise ConfigError(f"unexpected arguments: {rest[1:]} (see --help)")
  return rest


def _quiet_orbax_logs() -> None:
  """Orbax logs each failure of its background threads with a traceback, then raises it in the
  caller, where it becomes the run's one line: its log lines are dropped."""
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)


def main(argv):
  del argv  # _parse_flags took every argument
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  _quiet_orbax_logs()
  from efqat_jax.pipeline import pipeline_schema, run_pipeline

  config = FLAGS["config"].value
  if FLAGS["fields"].value:
    print(fields.describe(pipeline_schema(), config))
    return
  results = run_pipeline(config, FLAGS["workdir"].value)
  print(results_table(results))
  print(allocator.describe())


def _storage_line(error: BaseException, reason: str) -> str:
  """The one line for a write the file system refused, naming the file where known."""
  what = f"a write failed: {reason}"
  while error is not None:
    if isinstance(error, StorageError):
      what = str(error)
      break
    if isinstance(error, OSError) and error.filename:
      what = f"cannot write {error.filename}: {reason}"
      break
    error = error.__cause__ or error.__context__
  return f"error: {what}; the same command resumes the run once that is fixed"


def cli() -> None:
  """The entry point: user errors, refused writes, Ctrl-C and SIGTERM end in one line, not a
  traceback."""
  allocator.use_jemalloc()  # restarts this process under jemalloc where it is installed
  from efqat_jax.train.interrupt import stop_on_signals  # JAX: imported once, after the restart

  stop_on_signals(signal.SIGINT, signal.SIGTERM)  # even if inherited as ignored
  argv = sys.argv = _config_first(sys.argv)  # config_flags reads sys.argv itself
  try:
    if any(arg in HELP_FLAGS for arg in argv[1:]):
      define_flags()
      app.define_help_flags()
      app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True)
      return
    check_command_line(argv)
    define_flags()
    app.run(main, argv=argv, flags_parser=_parse_flags)
  except UserError as e:
    _exit(f"error: {e}", 2)
  except KeyboardInterrupt as e:
    signum = getattr(e, "signum", signal.SIGINT)
    stopped = "terminated" if signum == signal.SIGTERM else "interrupted"
    _exit(f"{stopped}: run the same command again to resume from the workdir", 128 + signum)
  except Exception as e:
    reason = storage_reason(e)
    if reason is None:
      raise
    _exit(_storage_line(e, reason), 1)


def _exit(line: str, status: int) -> None:
  """Prints ``line`` to stderr and ends the process now. The stages have closed their
  checkpoints and writers while unwinding; an interrupt can leave a background thread of orbax
  waiting on an executor that is already shut down, and a normal exit would wait for it forever
  (what is unfinished there is what a kill leaves, and a rerun resumes from it)."""
  print(line, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


if __name__ == "__main__":
  cli()
