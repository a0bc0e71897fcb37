"""Command line: ``python -m efqat_jax.main --config=configs/<name>.py --workdir=<dir>``.

Runs the configured stages (fp, ptq, qat, efqat, export), resuming from the workdir, and prints
one table of metric and wall time per stage (also in ``<workdir>/results.json``). With no flags
it runs ``configs/cnn_mnist5k.py`` in ``./workdir``. Override a field with
``--config.<field>=<value>``; ``--fields`` lists every field with its value and meaning.

A user's mistake (a bad value, a typo'd field, a dataset that does not fit) is one line on
stderr and exit status 2, before any file is written; Ctrl-C stops with one line (status 130)
and leaves a workdir that the same command resumes.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from efqat_jax import fields
from efqat_jax.errors import ConfigError, UserError

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
      if result.get("overflow_free"):
        metric += ", overflow-free as promised"
    if "mode" in result:  # efqat
      metric += (
        f" ({result['mode']}, rho {result['rho']:g}: {100 * result['param_fraction']:.1f}% of"
        " kernel params trained)"
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  from efqat_jax.pipeline import pipeline_schema, run_pipeline
  from efqat_jax.train import interrupt_guard

  config = FLAGS["config"].value
  if FLAGS["fields"].value:
    print(fields.describe(pipeline_schema(), config))
    return
  with interrupt_guard():
    results = run_pipeline(config, FLAGS["workdir"].value)
  print(results_table(results))


def cli() -> None:
  """The entry point: user errors and Ctrl-C end in one line, not a traceback."""
  try:
    check_command_line(sys.argv)
    define_flags()
    app.run(main)
  except UserError as e:
    _exit(f"error: {e}", 2)
  except KeyboardInterrupt:
    _exit("interrupted: run the same command again to resume from the workdir", 130)


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
