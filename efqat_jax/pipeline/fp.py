"""Stage ``fp``: train (or resume training) the full-precision model."""

from __future__ import annotations

import time

import jax

from efqat_jax.pipeline.context import Run
from efqat_jax.pipeline.stage import STAGES, ModelState, Stage
from efqat_jax.pipeline.training import train, training_fields


def run_fp(run: Run, inputs: dict[str, ModelState]) -> ModelState:
  del inputs  # the first stage
  variables = run.init(run.model)
  start = time.perf_counter()
  state = train(run, "fp", run.model, variables, run.config.fp)
  if "fp" not in run.results:
    result = run.evaluate(run.model, state, "fp")
    run.record("fp", {**result, "wall_time_s": time.perf_counter() - start})
  return ModelState(jax.device_get(state.variables))


FP = STAGES.register(
  "fp",
  Stage(
    run=run_fp,
    needs=lambda config, finished: (),
    fields=lambda config: ("fp",),
    summary="train the full-precision model",
    blocks=lambda: {
      "fp": training_fields(steps=600, learning_rate=3e-3, weight_decay=1e-4, warmup_steps=50)
    },
  ),
)
