"""``run_pipeline``: every check first, then the stages in order, each resumable."""

from __future__ import annotations

import pathlib
import sys

import ml_collections

from efqat_jax import fields
from efqat_jax.errors import WorkdirError
from efqat_jax.pipeline import fingerprint
from efqat_jax.pipeline import workdir as workdir_lib
from efqat_jax.pipeline.context import CHECKPOINT_DIGEST, Run
from efqat_jax.pipeline.outputs import remove_partials
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


def lost_checkpoints(run: Run) -> set[str]:
  """The finished stages whose checkpoints are gone (their result records the final one)."""
  return {
    stage
    for stage, result in run.results.items()
    if CHECKPOINT_DIGEST in result and not run.has_checkpoints(stage)
  }


def prepare(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> tuple[Run, dict]:
  """Runs every check (config values, workdir, dataset metadata, layer paths, fingerprints)
  without writing a file (the workdir's check creates and removes an empty directory); returns
  the run and its plan. A finished stage whose checkpoints are gone is planned again
  (``run_pipeline`` rebuilds it)."""
  fields.validate(config, pipeline_schema())
  workdir_lib.check_usable(workdir)
  run = Run(config, workdir)
  run.check_data()
  for stage in STAGES.items():
    if stage[1].check is not None:
      stage[1].check(run)
  stages = plan(config, set(run.results) - lost_checkpoints(run))
  fingerprint.check(run, stages)
  return run, stages


def _check_rebuilt(run: Run, stage: str) -> None:
  """A finished stage that ran again ends at the checkpoint its result recorded: the stages
  after it were made from that one. One that does not is moved aside (``<stage>.differs``)."""
  recorded = run.results[stage].get(CHECKPOINT_DIGEST)
  if recorded is None or run.checkpoint_digest(stage) == recorded:
    return
  directory = run.workdir / stage
  target, n = directory.with_name(f"{stage}.differs"), 0
  while target.exists():
    n += 1
    target = directory.with_name(f"{stage}.differs-{n}")
  moved = directory.rename(target)
  raise WorkdirError(
    f"the rebuilt {directory} differs from the one {run.results_path.name} records (the stages"
    f" after {stage} were made from that one; it is kept as {moved.name}): delete the outputs"
    f" of {stage} and the stages after it, and their entries in {run.results_path}, to redo them"
  )


def run_pipeline(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Runs the configured stages in order; returns the results of every finished stage.

  Raises:
    UserError: a check failed (nothing is written then), or the workdir is in use by another
      run (WorkdirError).
    StorageError: the file system refused a write (e.g. no space left); the run resumes once
      that is fixed.
  """
  prepare(config, workdir)  # every check, before the lock file is written
  with workdir_lib.hold(workdir):
    run, stages = prepare(config, workdir)  # again: another run may have ended in between
    remove_partials(run.workdir)
    fingerprint.write_missing(run, stages)
    requested = stage_list(config)
    lost = lost_checkpoints(run)
    outputs: dict[str, ModelState | None] = {}
    for stage, needs in stages.items():
      if stage in lost:
        print(
          f"{stage}: {run.workdir / stage} is missing; rebuilding it ({run.results_path.name}"
          f" records {stage} as finished)",
          file=sys.stderr,
        )
      elif stage not in requested:
        users = [s for s, n in stages.items() if stage in n]
        action = "restoring it" if stage in run.results else "running it"
        print(
          f"{stage}: not in config.stages, but {', '.join(users)} needs it: {action}",
          file=sys.stderr,
        )
      outputs[stage] = STAGES.get(stage).run(run, {n: outputs[n] for n in needs})
      if stage in lost:
        _check_rebuilt(run, stage)
  return run.results
