"""The pipeline's config: the run-level fields plus the blocks every registered stage owns."""

from __future__ import annotations

import ml_collections

from efqat_jax.fields import Check, Field, Schema, to_config
from efqat_jax.pipeline.context import RUN_FIELDS
from efqat_jax.pipeline.stage import STAGES


def stage_list(config: ml_collections.ConfigDict) -> list[str]:
  """``config.stages`` as a list of stage names."""
  return [s.strip() for s in str(config.stages).split(",")]


def _stages_check() -> Check:
  names = STAGES.names()

  def ok(value):
    return isinstance(value, str) and all(s.strip() in names for s in value.split(","))

  return Check(f"a comma-separated list of {', '.join(names)}", ok)


def pipeline_schema() -> Schema:
  """Every field of the pipeline's config (blocks of the same name are merged)."""
  stages = RUN_FIELDS["stages"]
  schema: Schema = {**RUN_FIELDS, "stages": Field(stages.default, stages.meaning, _stages_check())}
  for stage in STAGES.items():
    for block, fields in stage[1].blocks().items():
      schema[block] = {**schema.get(block, {}), **fields}
  return schema


def base_config() -> ml_collections.ConfigDict:
  """The default config (type-safe); files in configs/ start from it."""
  return to_config(pipeline_schema())
