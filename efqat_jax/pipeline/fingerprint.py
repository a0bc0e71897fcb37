"""Stage fingerprints: the config values each stage's result depends on, kept in
``<workdir>/stage_configs/<stage>.json``.

A stage's fingerprint holds the run-level fields, its own fields and those of every stage it
needs, and which stages it took its input from. A changed value is an error that names each
stage it affects; a stage output without a fingerprint is an error too (nothing can tell which
config made it).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_collections

from efqat_jax.errors import ConfigError, DataError
from efqat_jax.fields import Field
from efqat_jax.pipeline.context import RESULT_FIELDS, Run
from efqat_jax.pipeline.outputs import write_json
from efqat_jax.pipeline.schema import pipeline_schema
from efqat_jax.pipeline.stage import STAGES

VERSION = 2
DIRECTORY = "stage_configs"


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping) and value:
    out = {}
    for k, v in value.items():
      out.update(_leaves(v, f"{prefix}.{k}"))
    return out
  return {prefix: json.loads(json.dumps(value))}


def fingerprint(config: ml_collections.ConfigDict, stage: str, needs: Mapping[str, tuple]) -> dict:
  """``{"version", "needs", "fields": {dotted field: value}}`` of ``stage``."""
  fields: dict[str, Any] = {}
  for name in RESULT_FIELDS:
    fields.update(_leaves(config[name], name))
  todo, seen = [stage], set()
  while todo:
    s = todo.pop()
    if s in seen:
      continue
    seen.add(s)
    for name in STAGES.get(s).fields(config):
      fields.update(_leaves(config[name], name))
    todo.extend(needs[s])
  inputs = {s: list(needs[s]) for s in sorted(seen)}
  return {"version": VERSION, "inputs": inputs, "fields": dict(sorted(fields.items()))}


def path(run: Run, stage: str) -> pathlib.Path:
  return run.workdir / DIRECTORY / f"{stage}.json"


def has_output(run: Run, stage: str) -> bool:
  return (run.workdir / stage).exists() or stage in run.results


def read(run: Run, stage: str) -> dict | None:
  p = path(run, stage)
  if not p.exists():
    if has_output(run, stage):
      raise DataError(
        f"{run.workdir / stage} has no fingerprint {p}, so nothing tells which config made it;"
        f" delete {run.workdir / stage} and its entry in {run.results_path.name} to redo it"
      )
    return None
  try:
    saved = json.loads(p.read_text())
  except json.JSONDecodeError:
    saved = None
  if not isinstance(saved, dict) or saved.get("version") != VERSION:
    raise DataError(f"{p} is not a fingerprint this version wrote; use a new --workdir")
  return saved


def _default(schema: Mapping[str, Any], dotted: str) -> Any:
  """The JSON value of the field's default in ``schema``, or ``"<unset>"`` for no such field."""
  node: Any = schema
  for name in dotted.split("."):
    if not isinstance(node, Mapping) or name not in node:
      return "<unset>"
    node = node[name]
  return json.loads(json.dumps(node.default)) if isinstance(node, Field) else "<unset>"


def check(run: Run, needs: Mapping[str, tuple[str, ...]]) -> None:
  """Raises ConfigError naming each changed field and the stages it affects.

  ``needs`` gives the inputs of the stages this run will run; a stage outside it is compared
  with the inputs its fingerprint recorded.
  """
  changed: dict[str, list[str]] = {}
  schema = pipeline_schema()
  for stage in STAGES:
    saved = read(run, stage)
    if saved is None:
      continue
    resolved = {**{s: tuple(v) for s, v in saved["inputs"].items()}, **needs}
    current = fingerprint(run.config, stage, resolved)
    if current["inputs"] != saved["inputs"]:
      was = saved["inputs"].get(stage)
      changed.setdefault(f"the input of {stage} (was {was}, now {list(needs[stage])})", []).append(
        stage
      )
    for field in sorted(set(saved["fields"]) | set(current["fields"])):
      # A field added to the config since, at its default, left the saved result as it was.
      was = saved["fields"][field] if field in saved["fields"] else _default(schema, field)
      if was != current["fields"].get(field, "<unset>"):
        changed.setdefault(field, []).append(stage)
  if changed:
    what = "; ".join(f"{field} (used by {', '.join(stages)})" for field, stages in changed.items())
    stages = sorted({s for ss in changed.values() for s in ss}, key=list(STAGES).index)
    raise ConfigError(
      f"the config differs from the one {run.workdir} was made with: {what}; use a new"
      f" --workdir, or delete the outputs of {', '.join(stages)} there to redo them"
    )


def write_missing(run: Run, needs: Mapping[str, tuple[str, ...]]) -> None:
  """Records the fingerprint of every stage this run will run that has none yet."""
  for stage in needs:
    if not path(run, stage).exists():
      write_json(path(run, stage), fingerprint(run.config, stage, needs))
