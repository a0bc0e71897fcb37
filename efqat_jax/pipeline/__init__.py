"""The pipeline: fp -> ptq -> qat / efqat -> export, one stage per module, each resumable.

Stages, PTQ methods and QAT variants are registries: a new one is a module that registers
itself (with its config block) and an import here.

A run keeps everything in its workdir:
  data/            prepared datasets (unless config.data_dir is set)
  fp/ ptq/ qat/ efqat/   orbax checkpoints of each stage (verified by digest on restore)
  tb/<stage>/      TensorBoard event files (training and eval metrics)
  stage_configs/   each stage's fingerprint: the config values its result depends on
  export/          layers.npz: integer weights, scales, zero points, bit widths and, per layer,
                   what its overflow proof assumed (efqat_jax.quant.check_export_accumulators)
  .lock            held by the run writing the workdir (a second run on it refuses)
  results.json     metric and wall time of every finished stage (a finished stage is skipped)
"""

# The stages run in the order they register: fp, ptq, qat, efqat, export.
# isort: off
from efqat_jax.pipeline import fp, ptq, qat, qat_full, qat_efqat, qat_block_replacement, export  # noqa: F401

# isort: on
from efqat_jax.pipeline.context import Run
from efqat_jax.pipeline.qat import QAT_LOSSES, QAT_VARIANTS, QatLoss, QatVariant
from efqat_jax.pipeline.runner import plan, prepare, run_pipeline
from efqat_jax.pipeline.schema import base_config, pipeline_schema, stage_list
from efqat_jax.pipeline.stage import STAGES, ModelState, Stage

__all__ = [
  "QAT_LOSSES",
  "QAT_VARIANTS",
  "QatLoss",
  "STAGES",
  "ModelState",
  "QatVariant",
  "Run",
  "Stage",
  "base_config",
  "pipeline_schema",
  "plan",
  "prepare",
  "run_pipeline",
  "stage_list",
]
