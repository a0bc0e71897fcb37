"""``run_pipeline``: every check first, then the stages in order, each resumable."""

from __future__ import annotations

import pathlib
import sys

import ml_collections

from efqat_jax import fields
from efqat_jax.pipeline import fingerprint
from efqat_jax.pipeline.context import Run
from efqat_jax.pipeline.schema import pipeline_schema, stage_list
from efqat_jax.pipeline.stage import STAGES, ModelState


def plan(config: ml_collections.ConfigDict, finished: set[str]) -> dict[str, tuple[str, ...]]:
  """The stages to run, in order, each with the stages it takes its input from: every listed
  stage that has not finished, and whatever those need (restored if finished, else run)."""
  requested = stage_list(config)
  todo = [s for s in requested if s not in finished]
  needs: dict[str, tuple[str, ...]] = {}
  while todo:
    stage = todo.pop()
    if stage not in needs:
      needs[stage] = tuple(STAGES.get(stage).needs(config, finished))
      todo.extend(needs[stage])
  return {s: needs[s] for s in STAGES if s in needs}


def prepare(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> tuple[Run, dict]:
  """Runs every check (config values, dataset metadata, layer paths, fingerprints) without
  writing a file; returns the run and its plan."""
  fields.validate(config, pipeline_schema())
  run = Run(config, workdir)
  run.check_data()
  for stage in STAGES.items():
    if stage[1].check is not None:
      stage[1].check(run)
  stages = plan(config, set(run.results))
  fingerprint.check(run, stages)
  return run, stages


def run_pipeline(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Runs the configured stages in order; returns the results of every finished stage."""
  run, stages = prepare(config, workdir)
  fingerprint.write_missing(run, stages)
  requested = stage_list(config)
  outputs: dict[str, ModelState | None] = {}
  for stage, needs in stages.items():
    if stage not in requested:
      users = [s for s, n in stages.items() if stage in n]
      action = "restoring it" if stage in run.results else "running it"
      print(
        f"{stage}: not in config.stages, but {', '.join(users)} needs it: {action}", file=sys.stderr
      )
    outputs[stage] = STAGES.get(stage).run(run, {n: outputs[n] for n in needs})
  return run.results
