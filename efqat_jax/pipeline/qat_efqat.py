"""QAT variant ``efqat``: train the channels or layers selected by importance (``importance``),
re-selected every ``reselect_every`` steps, plus the non-weight params (where ``cheap_params``
says); the optimizer freezes the rest and the backward pass skips their weight gradients.
``ptq_error`` ranks against the float model, which the stage then reads from stage ``fp``."""

from __future__ import annotations

import math

import jax
import tqdm

from efqat_jax.efqat import (
  CHEAP_PARAMS,
  IMPORTANCES,
  MODES,
  RHO_UNITS,
  ReselectingStep,
  TrainableSet,
  freeze_unselected,
  restrict_backward,
  select,
  trainable_from_state,
)
from efqat_jax.efqat.importance import NEEDS_REFERENCE
from efqat_jax.fields import Field, boolean, integer, number, one_of
from efqat_jax.nn import quantized_layers
from efqat_jax.pipeline.qat import QAT_VARIANTS, QatVariant
from efqat_jax.pipeline.training import train

# rounding_error is left out: the stage ranks the PTQ model, whose weights all lie on their grid
PIPELINE_IMPORTANCES = tuple(i for i in IMPORTANCES if i != "rounding_error")

EFQAT_FIELDS = {
  "mode": Field(
    "cwpl", "cwpl, cwpn, lwpn, or the ends qat / ptq (efqat_jax.efqat.select)", one_of(*MODES)
  ),
  "rho": Field(
    0.1,
    "the trained fraction: of output channels in cwpl; in cwpn and lwpn, of what rho_unit counts",
    number(0, 1),
  ),
  "rho_unit": Field(
    "work",
    "what rho counts in cwpn and lwpn: work (channels or layers taken in order of importance"
    " while their weight-gradient multiply-adds fit in rho of the network's: a weight counts"
    " its layer's output positions), params (the same, counting weights) or blocks (channels,"
    " or layers for lwpn: the paper's reading)",
    one_of(*RHO_UNITS),
  ),
  "reselect_every": Field(100, "steps between importance re-rankings (0: rank once)", integer(0)),
  "bucket": Field(
    4,
    "cwpn: per-layer counts are multiples of it, rounded up in blocks and paid for within rho in"
    " work and params (fewer recompiles)",
    integer(1),
  ),
  "reuse_steps": Field(
    True,
    "a re-selection whose per-layer counts fit a step compiled earlier in the stage (cwpn's"
    " counts move) runs that step, padded: no recompilation, the padded channels' gradient work",
    boolean(),
  ),
  "train_frozen_scales": Field(
    False, "True: frozen channels' weight scales train too (full weight-gradient cost)", boolean()
  ),
  "cheap_params": Field(
    "all_layers",
    "where biases, norms and quantizer params train: all_layers, or selected_layers (only in"
    " layers with selected weights; the backward pass stops below the lowest one)",
    one_of(*CHEAP_PARAMS),
  ),
  "importance": Field(
    "bn_folded",
    "how channels and layers are ranked: bn_folded (mean |w| * gamma / sigma of the following"
    " BatchNorm; mean |w| where none follows), mean_abs (mean |w|, the paper), fan_in (mean"
    " |w| * sqrt(fan_in)), or ptq_error (the norm of the float model's weights minus the"
    " quantized ones, times gamma / sigma; reads stage fp); not rounding_error, which scores 0"
    " on PTQ's on-grid weights",
    one_of(*PIPELINE_IMPORTANCES),
  ),
}


def configured_selection(settings, variables, layers, reference=None) -> TrainableSet:
  """The selection ``config.efqat`` (``settings``) makes on ``variables`` (``reference``: the
  float model's params, which ``ptq_error`` ranks against)."""
  return select(
    variables["params"],
    layers,
    settings.mode,
    settings.rho,
    settings.bucket,
    settings.train_frozen_scales,
    settings.cheap_params,
    settings.importance,
    variables.get("batch_stats", {}),
    settings.rho_unit,
    reference,
  )


def needs_fp(config) -> bool:
  """Whether the selection reads the float model (``ptq_error``)."""
  return config.efqat.importance in NEEDS_REFERENCE


def train_efqat(run, stage, qmodel, variables, cfg, fp, **step_options):
  settings = run.config.efqat
  every = settings.reselect_every or None
  layers = quantized_layers(qmodel, variables, run.sample_inputs, train=False)
  reference = None
  if needs_fp(run.config):
    if fp is None:
      raise ValueError(
        f"efqat.importance={settings.importance!r} ranks against the float model: run the stage"
        " with the fp stage's output as inputs['fp']"
      )
    reference = fp.variables["params"]
  recompiles = [0]

  def selector(variables):
    return configured_selection(settings, variables, layers, reference)

  def reselecting(step_fn, writer):
    def on_select(step, params, trainable, new_compiles):
      recompiles[0] += new_compiles
      scalars = {f"selection/{k}": v for k, v in trainable.summary().items()}
      writer.write(step, {**scalars, "selection/recompiles": recompiles[0]})
      if new_compiles and step:
        tqdm.tqdm.write(f"{stage} step {step}: no compiled step fits the new counts; compiling")

    return ReselectingStep(step_fn, selector, every, on_select, settings.reuse_steps)

  state = train(
    run,
    stage,
    qmodel,
    variables,
    cfg,
    wrap_tx=freeze_unselected,
    param_context=restrict_backward,
    wrap_step=reselecting,
    **step_options,
  )
  params = jax.device_get(state.params)
  last = trainable_from_state(jax.device_get(state.opt_state), params, layers)  # after a resume
  summary = last.summary()
  return state, {
    "mode": settings.mode,
    "rho": settings.rho,
    "rho_unit": settings.rho_unit,
    "cheap_params": last.cheap_params,
    "importance": settings.importance,
    "channel_fraction": summary["channel_fraction"],
    "param_fraction": summary["param_fraction"],
    "work_fraction": summary["work_fraction"],
    "selections": 1 if every is None else math.ceil(cfg.steps / every),
    "recompiles_this_process": recompiles[0],
  }


EFQAT = QAT_VARIANTS.register(
  "efqat",
  QatVariant(
    train_efqat,
    summary="train only the most important channels or layers (EfQAT)",
    fields=EFQAT_FIELDS,
    needs_fp=needs_fp,
  ),
)
