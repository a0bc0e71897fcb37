"""Command line: ``python -m efqat_jax.main --config=configs/<name>.py --workdir=<dir>``.

Runs the configured stages (fp, ptq, qat, export), resuming from the workdir's checkpoints,
and prints one table of metric and wall time per stage (also in ``<workdir>/results.json``).
With no flags it runs ``configs/cnn_mnist5k.py`` in ``./workdir``.
"""

from __future__ import annotations

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from efqat_jax import stages

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "cnn_mnist5k.py"

_CONFIG = config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Checkpoints, logs and results go here.")


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
        f"{result['layers']} layers, integer/fake-quant prediction agreement"
        f" {100 * result['prediction_agreement']:.1f}%, max accumulator {result['max_accumulator']}"
      )
    if "mode" in result:  # efqat
      metric += (
        f" ({result['mode']}, rho {result['rho']:g}: {100 * result['param_fraction']:.1f}% of"
        " kernel params trained)"
      )
    lines.append(f"| {stage} | {metric} | {result['wall_time_s']:.1f} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  stages.validate(_CONFIG.value)
  results = stages.run_pipeline(_CONFIG.value, _WORKDIR.value)
  print(results_table(results))


if __name__ == "__main__":
  app.run(main)
