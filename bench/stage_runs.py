"""Pipeline stages run one after another in a workdir of a benchmark, resuming what is done.

Benchmarks train each model's float stage once (``<root>/<model>``) and hand it to many
PTQ / QAT runs, one workdir each; a run already recorded in its ``results.json`` is not redone.
"""

from __future__ import annotations

import json
import pathlib

from efqat_jax import pipeline


def stage_results(config, workdir: pathlib.Path, fp, stages) -> dict:
  """``results.json`` of ``workdir`` once ``stages`` (in order, each fed the one before it and
  the fp stage's output ``fp``) are finished there."""
  path = workdir / "results.json"
  done = json.loads(path.read_text()) if path.exists() else {}
  if all(stage in done for stage in stages):
    return done
  run = pipeline.Run(config, workdir)
  name, state = "fp", fp
  for stage in stages:
    name, state = stage, pipeline.STAGES.get(stage).run(run, {"fp": fp, name: state})
  return run.results


def metric_of(result: dict, name: str) -> float:
  """A stage result's metric: accuracy in percent, or bits per character."""
  return result[name] * (100.0 if name == "accuracy" else 1.0)
