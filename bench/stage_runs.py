"""Pipeline stages run in a workdir of a benchmark, resuming what is done.

Benchmarks train each model's float stage once (``<root>/<model>``) and hand it to many
PTQ / QAT runs, one workdir each; a stage already finished there is restored, not redone, once
the pipeline's fingerprint check has found it made with the same config values.
"""

from __future__ import annotations

import pathlib

from efqat_jax import pipeline
from efqat_jax.pipeline import fingerprint


def _needs(config, stage: str) -> dict[str, tuple[str, ...]]:
  """``stage`` and every stage it takes its input from, each with its inputs."""
  needs: dict[str, tuple[str, ...]] = {}
  todo = [stage]
  while todo:
    name = todo.pop()
    if name not in needs:
      needs[name] = tuple(pipeline.STAGES.get(name).needs(config, set()))
      todo.extend(needs[name])
  return needs


def run_stage(run: pipeline.Run, stage: str, inputs: dict):
  """``stage``'s output in ``run`` (trained on ``inputs``, the outputs of the stages it needs,
  made here or elsewhere; or restored where it finished). As the command line does, it first
  checks the stage fingerprints recorded in the workdir: a stage made with other config values,
  or one with no fingerprint, is a ConfigError / DataError that says what to delete, never a
  result; then records the fingerprints of ``stage`` and its inputs where missing."""
  needs = _needs(run.config, stage)
  fingerprint.check(run, needs)
  fingerprint.write_missing(run, needs)
  return pipeline.STAGES.get(stage).run(run, inputs)


def stage_results(config, workdir: pathlib.Path, fp, stages) -> dict:
  """The results of ``workdir`` once ``stages`` (in order, each fed the one before it and the
  fp stage's output ``fp``) are finished there."""
  run = pipeline.Run(config, workdir)
  name, state = "fp", fp
  for stage in stages:
    name, state = stage, run_stage(run, stage, {"fp": fp, name: state})
  return run.results


def metric_of(result: dict, name: str) -> float:
  """A stage result's metric: accuracy in percent, or bits per character."""
  return result[name] * (100.0 if name == "accuracy" else 1.0)
