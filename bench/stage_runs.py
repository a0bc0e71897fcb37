"""Pipeline stages run in a workdir of a benchmark, resuming what is done.

Benchmarks train each model's float stage once (``<root>/<model>``) and hand it to many
PTQ / QAT runs, one workdir each; a stage already finished there is restored, not redone, once
the pipeline's fingerprint check has found it made with the same config values.
"""

from __future__ import annotations

import pathlib
import shutil

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


def checked(run: pipeline.Run, stage: str) -> bool:
  """Whether ``stage`` finished in ``run``, after the check the command line makes: a stage
  recorded in the workdir with other config values, or with no fingerprint, is a ConfigError /
  DataError that says what to delete, never a result. Records the fingerprints of ``stage`` and
  the stages it takes its input from where missing."""
  needs = _needs(run.config, stage)
  fingerprint.check(run, needs)
  fingerprint.write_missing(run, needs)
  return stage in run.results


def run_stage(run: pipeline.Run, stage: str, inputs: dict):
  """``stage``'s output in ``run``: trained on ``inputs`` (the outputs of the stages it needs,
  made here or elsewhere), or restored where it finished (``checked``)."""
  checked(run, stage)
  return pipeline.STAGES.get(stage).run(run, inputs)


def stage_results(config, workdir: pathlib.Path, fp, stages) -> dict:
  """The results of ``workdir`` once ``stages`` are finished there (``checked``; all finished:
  nothing restored). Each stage, in order, is fed the outputs it needs, as the command line
  feeds them: of the stages before it in ``stages``, or the fp stage's output ``fp``."""
  run = pipeline.Run(config, workdir)
  if all([checked(run, stage) for stage in stages]):
    return run.results
  outputs = {"fp": fp}
  for stage in stages:
    needs = pipeline.STAGES.get(stage).needs(run.config, set(run.results))
    outputs[stage] = run_stage(run, stage, {name: outputs[name] for name in needs})
  return run.results


def seeded_workdir(source: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path:
  """``workdir``, made once as a copy of the run in ``source``, whose finished stages are then
  restored there instead of made again. A chain of later stages with config values of its own
  runs there, so their fingerprints never enter ``source``, whose run stays resumable."""
  if not workdir.exists():
    partial = workdir.with_name(f"{workdir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # a copy cut short
    shutil.copytree(source, partial)
    partial.rename(workdir)
  return workdir
