"""The pipeline's stages: fp -> ptq -> qat / efqat -> export, each resumable from its checkpoint.

qat and efqat both start from the ptq model; export exports the last quantized model trained
(efqat if it ran, else qat, else ptq).

A run keeps everything in its workdir:
  data/            prepared datasets (unless config.data_dir is set)
  fp/ ptq/ qat/ efqat/   orbax checkpoints of each stage
  tb/<stage>/      TensorBoard event files
  stage_configs/   the config fields each trained stage depends on (a changed field is an
                   error, not a silent reuse of the old checkpoint)
  export/          integer weights, scales and zero points (layers.npz) of the final model
  results.json     metric and wall time of every finished stage (a finished stage is skipped
                   when the command runs again)
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax.traverse_util import flatten_dict, unflatten_dict

from efqat_jax import data, models
from efqat_jax.efqat import (
  MODES,
  ReselectingStep,
  freeze_unselected,
  restrict_backward,
  select,
  trainable_from_state,
)
from efqat_jax.nn import (
  QUANT_STATS,
  QuantizedLayer,
  QuantRule,
  export_integer,
  integer_apply,
  quantize,
  quantized_layers,
)
from efqat_jax.nn.intercept import quantizable_paths
from efqat_jax.nn.ops import WEIGHT_ESTIMATORS
from efqat_jax.ptq import calibrate
from efqat_jax.quant import QuantSpec
from efqat_jax.train import (
  Checkpointer,
  MetricWriter,
  TrainState,
  create_train_state,
  make_eval_step,
  make_mesh,
  make_optimizer,
  make_train_step,
  replicate,
  shard_batch,
  train_loop,
)

STAGES = ("fp", "ptq", "qat", "efqat", "export")
_FP_INPUTS = ("seed", "dataset", "train_split", "task", "model", "model_kwargs", "batch_size", "fp")
# The config fields a stage's checkpoint depends on (its own and those of the stages before it).
STAGE_INPUTS = {
  "fp": _FP_INPUTS,
  "ptq": (*_FP_INPUTS, "quant", "ptq"),
  "qat": (*_FP_INPUTS, "quant", "ptq", "qat"),
  "efqat": (*_FP_INPUTS, "quant", "ptq", "efqat"),
}
TASKS = ("classification", "lm")


class Run:
  """One pipeline run: config, workdir, data, mesh and the stage results so far."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
    self.config = config
    self.workdir = pathlib.Path(workdir).absolute()
    self.workdir.mkdir(parents=True, exist_ok=True)
    data_dir = config.data_dir or str(self.workdir / "data")
    self.train_source = data.load(config.dataset, data_dir, config.train_split)
    self.eval_source = data.load(config.dataset, data_dir, config.eval_split)
    self._check_data()
    self.mesh = make_mesh()
    self.model = models.get_model(config.model, **config.model_kwargs)
    self.results_path = self.workdir / "results.json"
    self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}

  # --- data -------------------------------------------------------------------------------

  def _check_data(self) -> None:
    """The dataset fits the task and the batch size (checked before any training)."""
    feature = "tokens" if self.config.task == "lm" else "image"
    if feature not in self.train_source[0]:
      raise ValueError(
        f"config.task = {self.config.task!r} needs a dataset with {feature!r} examples;"
        f" {self.config.dataset!r} has {sorted(self.train_source[0])}"
      )
    if self.config.batch_size > len(self.train_source):
      raise ValueError(
        f"config.batch_size = {self.config.batch_size} exceeds the {len(self.train_source)}"
        f" examples of split {self.config.train_split!r}"
      )

  def to_model_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Dataset features -> ``inputs``, ``labels``, ``mask`` (next-token targets for ``lm``)."""
    if self.config.task == "lm":
      tokens = batch["tokens"]
      return {"inputs": tokens[:, :-1], "labels": tokens[:, 1:], "mask": batch["mask"]}
    return {"inputs": batch["image"], "labels": batch["label"], "mask": batch["mask"]}

  def train_batches(self, start_step: int) -> Iterator[dict[str, jax.Array]]:
    """The training batches from step ``start_step`` on (epochs reshuffled by seed)."""
    steps_per_epoch = len(self.train_source) // self.config.batch_size
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
      epoch_batches = data.batches(
        self.train_source, self.config.batch_size, seed=self.config.seed, epoch=epoch
      )
      for i, batch in enumerate(epoch_batches):
        if i >= skip:
          yield shard_batch(self.to_model_batch(batch), self.mesh)
      epoch, skip = epoch + 1, 0

  def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
    batches = data.batches(
      self.eval_source, self.config.eval_batch_size, shuffle=False, drop_remainder=False
    )
    for batch in batches:
      yield shard_batch(self.to_model_batch(batch), self.mesh)

  @functools.cached_property
  def sample_inputs(self) -> jax.Array:
    """The first training batch's inputs (for init, tracing and the export check)."""
    batch = next(data.batches(self.train_source, self.config.batch_size, seed=self.config.seed))
    return jnp.asarray(self.to_model_batch(batch)["inputs"])

  # --- evaluation -------------------------------------------------------------------------

  def evaluate(self, model, state: TrainState, stage: str) -> dict[str, float]:
    """Loss and accuracy over the whole eval split (bits per character for ``lm``)."""
    eval_step = make_eval_step(model, self.mesh)
    totals = {"loss": 0.0, "accuracy": 0.0, "count": 0.0}
    num_batches = math.ceil(len(self.eval_source) / self.config.eval_batch_size)
    batches = tqdm.tqdm(
      self.eval_batches(),
      total=num_batches,
      desc=f"{stage} eval",
      disable=not self.config.progress,
      leave=False,
    )
    for batch in batches:
      metrics = jax.device_get(eval_step(state, batch))
      count = float(metrics["count"])
      totals["loss"] += float(metrics["loss"]) * count
      totals["accuracy"] += float(metrics["accuracy"]) * count
      totals["count"] += count
    result = {k: totals[k] / totals["count"] for k in ("loss", "accuracy")}
    if self.config.task == "lm":
      result["bits_per_char"] = result["loss"] / math.log(2)
    return result

  # --- bookkeeping ------------------------------------------------------------------------

  def record(self, stage: str, result: dict[str, Any]) -> None:
    self.results[stage] = result
    partial = self.results_path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(self.results, indent=1) + "\n")
    os.replace(partial, self.results_path)  # an interrupted write never leaves broken JSON

  def checkpointer(self, stage: str) -> Checkpointer:
    self.check_stage_config(stage)
    return Checkpointer(self.workdir / stage)

  def stage_config(self, stage: str) -> dict:
    """The config fields ``stage`` depends on, as JSON values."""
    fields = {k: self.config[k] for k in STAGE_INPUTS[stage]}
    plain = {
      k: v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v for k, v in fields.items()
    }
    return json.loads(json.dumps(plain))

  def check_stage_config(self, stage: str) -> None:
    """Records the config a stage is trained with; raises if its workdir holds that stage
    trained (or partly trained) with different values."""
    path = self.workdir / "stage_configs" / f"{stage}.json"
    current = self.stage_config(stage)
    if path.exists():
      saved = json.loads(path.read_text())
      changed = sorted(_changed_fields(saved, current))
      if changed:
        raise ValueError(
          f"{self.workdir / stage} was trained with a different config (changed:"
          f" {', '.join(changed)}); use a new --workdir, or delete {self.workdir / stage} and"
          f" {path} to train that stage again"
        )
    elif (self.workdir / stage).exists() or stage in self.results:
      return  # trained before fingerprints existed: nothing to compare with
    else:
      path.parent.mkdir(exist_ok=True)
      path.write_text(json.dumps(current, indent=1) + "\n")

  def writer(self, stage: str) -> MetricWriter:
    return MetricWriter(self.workdir / "tb" / stage)

  # --- quantization -----------------------------------------------------------------------

  def quant_rules(self) -> list[QuantRule]:
    """All layers at the configured bits; ``high_precision_layers`` (default: the first and
    the last layer in call order) at ``high_precision_bits``; embedding tables in float unless
    ``quantize_embeddings`` (a lookup does no multiply-accumulate)."""
    q = self.config.quant
    kinds = quantizable_paths(self.model, self.sample_inputs, train=False)
    embeddings = [p for p, kind in kinds.items() if kind == "Embed"]
    float_rules = []
    if embeddings and not q.quantize_embeddings:
      float_rules = [QuantRule.keep_float("|".join(re.escape(p) for p in embeddings))]
    rules = [
      *float_rules,
      QuantRule(
        ".*",
        weight=QuantSpec.for_weights(q.weight_bits),
        input=QuantSpec.for_activations(q.act_bits),
      ),
    ]
    pattern = q.high_precision_layers
    if not pattern:
      return rules
    paths = [p for p in kinds if q.quantize_embeddings or p not in embeddings]
    if pattern == "auto":
      pattern = "|".join(re.escape(p) for p in dict.fromkeys([paths[0], paths[-1]]))
    high = [p for p in paths if re.fullmatch(pattern, p)]
    if not high:
      raise ValueError(
        f"config.quant.high_precision_layers = {q.high_precision_layers!r} matches no layer of"
        f" {self.config.model!r}; its layers are {paths}"
      )
    bits = q.high_precision_bits
    spec = dict(weight=QuantSpec.for_weights(bits), input=QuantSpec.for_activations(bits))
    high_rule = QuantRule(pattern, **spec)
    return [*float_rules, high_rule] if len(high) == len(paths) else [high_rule, *rules]

  @functools.cached_property
  def quantized_model(self):
    """The model quantized by ``quant_rules`` (raises for a pattern that matches no layer)."""
    return quantize(
      self.model, self.quant_rules(), weight_estimator=self.config.quant.weight_estimator
    )

  @functools.cached_property
  def quantized_layers(self) -> dict[str, QuantizedLayer]:
    """The quantized model's layers (traced abstractly: nothing is computed)."""
    qmodel, sample = self.quantized_model, self.sample_inputs
    variables = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), sample, train=False))
    return quantized_layers(qmodel, variables, sample, train=False)


def _changed_fields(saved: dict, current: dict, prefix: str = "") -> list[str]:
  """Dotted names of the fields whose values differ between two config dicts."""
  changed = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      changed += _changed_fields(a, b, f"{prefix}{key}.")
    elif a != b:
      changed.append(f"config.{prefix}{key}")
  return changed


def _train(run: Run, stage: str, model, variables: dict, cfg, reselect=None) -> TrainState:
  """Trains ``model`` from ``variables`` with the optimizer of ``cfg``; with ``reselect``
  (``step_fn -> step``, EfQAT) the optimizer freezes what the selection leaves out and the
  backward pass skips its weight gradients (``restrict_backward``)."""
  tx, schedule = make_optimizer(
    cfg.optimizer,
    learning_rate=cfg.learning_rate,
    steps=cfg.steps,
    warmup_steps=cfg.warmup_steps,
    weight_decay=cfg.weight_decay,
    quant_lr_multiplier=cfg.quant_lr_multiplier,
  )
  if reselect is None:
    step_fn = make_train_step(model, tx, run.mesh)
  else:
    tx = freeze_unselected(tx)
    step_fn = make_train_step(model, tx, run.mesh, param_context=restrict_backward)
  state = replicate(create_train_state(variables, tx), run.mesh)
  with run.checkpointer(stage) as ckpt, run.writer(stage) as writer:
    return train_loop(
      state,
      step_fn if reselect is None else reselect(step_fn, writer),
      run.train_batches,
      cfg.steps,
      checkpointer=ckpt,
      writer=writer,
      rng=jax.random.key(run.config.seed),
      checkpoint_every=run.config.checkpoint_every,
      log_every=run.config.log_every,
      learning_rate=schedule,
      description=stage,
      progress=run.config.progress,
    )


def _with_params(variables: dict, params: Any, collections: dict) -> dict:
  """``variables`` with every param and collection entry that ``params``/``collections`` have."""
  merged = {}
  for name, tree in {"params": params, **collections}.items():
    flat = flatten_dict(variables.get(name, {}))
    flat.update(flatten_dict(tree))
    merged[name] = unflatten_dict(flat)
  return {**variables, **merged}


def run_fp(run: Run) -> TrainState:
  """Trains (or resumes training) the float model."""
  variables = run.model.init(jax.random.key(run.config.seed), run.sample_inputs, train=False)
  start = time.perf_counter()
  state = _train(run, "fp", run.model, variables, run.config.fp)
  if "fp" not in run.results:
    result = run.evaluate(run.model, state, "fp")
    run.record("fp", {**result, "wall_time_s": time.perf_counter() - start})
  return state


def run_ptq(run: Run, fp_state: TrainState) -> dict:
  """Quantizes the float model: calibration on ``ptq.calibration_batches`` batches, then RTN."""
  qmodel = run.quantized_model
  with run.checkpointer("ptq") as ckpt:
    start = time.perf_counter()
    variables = qmodel.init(jax.random.key(run.config.seed), run.sample_inputs, train=False)
    variables = _with_params(
      variables, jax.device_get(fp_state.params), jax.device_get(fp_state.collections)
    )
    if ckpt.latest_step() is None:
      inputs = (b["inputs"] for b in run.train_batches(0))
      calibrated = calibrate(
        qmodel, variables, inputs, run.config.ptq.calibration_batches, train=False
      )
      # The running ranges are a by-product: the checkpoint holds what the model runs with.
      variables = {k: v for k, v in calibrated.items() if k != QUANT_STATS}
      ckpt.save(0, variables, wait=True)
    variables = ckpt.restore_latest(variables)
  if "ptq" not in run.results:
    state = replicate(create_train_state(variables, optax.identity()), run.mesh)
    run.record(
      "ptq", {**run.evaluate(qmodel, state, "ptq"), "wall_time_s": time.perf_counter() - start}
    )
  return variables


def run_qat(run: Run, ptq_variables: dict) -> TrainState:
  """Fine-tunes every param of the quantized model (weights and quantization params)."""
  qmodel = run.quantized_model
  start = time.perf_counter()
  state = _train(run, "qat", qmodel, ptq_variables, run.config.qat)
  if "qat" not in run.results:
    result = run.evaluate(qmodel, state, "qat")
    run.record("qat", {**result, "wall_time_s": time.perf_counter() - start})
  return state


def run_efqat(run: Run, ptq_variables: dict) -> TrainState:
  """EfQAT from the ptq model: trains the channels or layers ``config.efqat`` selects by
  importance (re-selected every ``reselect_every`` steps), plus every non-kernel param."""
  cfg, qmodel = run.config.efqat, run.quantized_model
  every = None if cfg.reselect_every in ("never", 0) else cfg.reselect_every
  log = {"recompiles": 0}

  layers = run.quantized_layers

  def selector(params):
    return select(params, layers, cfg.mode, cfg.rho, cfg.bucket, cfg.train_frozen_scales)

  def reselect(step_fn, writer):
    def on_select(step, params, trainable, recompiles):
      log["recompiles"] += recompiles
      scalars = {f"selection/{k}": v for k, v in trainable.summary().items()}
      writer.write(step, {**scalars, "selection/recompiles": log["recompiles"]})
      if recompiles and step:
        tqdm.tqdm.write(f"efqat step {step}: new per-layer counts, the step compiles again")

    return ReselectingStep(step_fn, selector, every, on_select)

  start = time.perf_counter()
  state = _train(run, "efqat", qmodel, ptq_variables, cfg, reselect)
  if "efqat" not in run.results:
    params = jax.device_get(state.params)
    last = trainable_from_state(jax.device_get(state.opt_state), params, layers)  # after a resume
    summary = last.summary()
    result = run.evaluate(qmodel, state, "efqat")
    run.record(
      "efqat",
      {
        **result,
        "wall_time_s": time.perf_counter() - start,
        "mode": cfg.mode,
        "rho": cfg.rho,
        "channel_fraction": summary["channel_fraction"],
        "param_fraction": summary["param_fraction"],
        "selections": 1 if every is None else math.ceil(cfg.steps / every),
        "recompiles_this_process": log["recompiles"],
      },
    )
  return state


def run_export(run: Run, variables: dict) -> None:
  """Integer weights, scales and zero points of the quantized model, checked on a batch."""
  start = time.perf_counter()
  sample, qmodel = run.sample_inputs, run.quantized_model
  layers = export_integer(qmodel, variables, sample, train=False)
  out = run.workdir / "export"
  out.mkdir(exist_ok=True)
  arrays = {}
  for path, layer in layers.items():
    for field in ("weight", "weight_scale", "input_scale", "input_zero_point", "bias"):
      value = getattr(layer, field)
      if value is not None:
        arrays[f"{path}/{field}"] = np.asarray(value)
  np.savez(out / "layers.npz", **arrays)
  fake = qmodel.apply(variables, sample, train=False)
  integer, accumulators = integer_apply(qmodel, variables, sample, train=False)
  agreement = float(jnp.mean(jnp.argmax(fake, -1) == jnp.argmax(integer, -1)))
  run.record(
    "export",
    {
      "layers": len(layers),
      "prediction_agreement": agreement,
      "max_abs_logit_diff": float(jnp.max(jnp.abs(fake - integer))),
      "max_accumulator": int(max(int(a) for a in jax.tree.leaves(accumulators))),
      "wall_time_s": time.perf_counter() - start,
    },
  )


def stage_list(config: ml_collections.ConfigDict) -> list[str]:
  """``config.stages`` as a list of stage names."""
  return [s.strip() for s in str(config.stages).split(",")]


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field, before any work starts."""

  def fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"config.{field} = {value!r} is not allowed: {allowed}")

  if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
    fail("seed", config.seed, "an integer >= 0")
  stages = stage_list(config)
  if not stages or any(s not in STAGES for s in stages):
    fail("stages", config.stages, f"a comma-separated subset of {','.join(STAGES)}")
  if config.model not in models.MODELS:
    fail("model", config.model, f"one of {sorted(models.MODELS)}")
  if config.task not in TASKS:
    fail("task", config.task, f"one of {TASKS}")
  for field in ("batch_size", "eval_batch_size", "log_every", "checkpoint_every"):
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      fail(field, value, "a positive integer")
  devices = jax.device_count()
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % devices:
      fail(field, config[field], f"a multiple of the {devices} visible devices")
  for stage in ("fp", "qat", "efqat"):
    cfg = config[stage]
    for field in ("steps", "warmup_steps"):
      value = cfg[field]
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        fail(f"{stage}.{field}", value, "an integer >= 0")
    for field in ("learning_rate", "weight_decay", "quant_lr_multiplier"):
      value = cfg[field]
      if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        fail(f"{stage}.{field}", value, "a finite number")
    if not cfg.learning_rate > 0:
      fail(f"{stage}.learning_rate", cfg.learning_rate, "a number > 0")
    if cfg.optimizer not in ("adamw", "sgd"):
      fail(f"{stage}.optimizer", cfg.optimizer, "'adamw' or 'sgd'")
    if cfg.weight_decay < 0:
      fail(f"{stage}.weight_decay", cfg.weight_decay, "a number >= 0")
    if not cfg.quant_lr_multiplier >= 0:
      fail(f"{stage}.quant_lr_multiplier", cfg.quant_lr_multiplier, "a number >= 0")
  q = config.quant
  for field in ("weight_bits", "act_bits", "high_precision_bits"):
    if isinstance(q[field], bool) or not isinstance(q[field], int) or not 2 <= q[field] <= 16:
      fail(f"quant.{field}", q[field], "an integer in 2..16")
  if not isinstance(q.quantize_embeddings, bool):
    fail("quant.quantize_embeddings", q.quantize_embeddings, "True or False")
  if q.weight_estimator not in WEIGHT_ESTIMATORS:
    fail("quant.weight_estimator", q.weight_estimator, f"one of {tuple(WEIGHT_ESTIMATORS)}")
  try:
    re.compile(q.high_precision_layers)
  except re.error as e:
    fail("quant.high_precision_layers", q.high_precision_layers, f"'auto', '' or a regex ({e})")
  if not isinstance(config.ptq.calibration_batches, int) or config.ptq.calibration_batches < 1:
    fail("ptq.calibration_batches", config.ptq.calibration_batches, "an integer >= 1")
  e = config.efqat
  if e.mode not in MODES:
    fail("efqat.mode", e.mode, f"one of {MODES}")
  if not isinstance(e.rho, int | float) or isinstance(e.rho, bool) or not 0 <= e.rho <= 1:
    fail("efqat.rho", e.rho, "a number in [0, 1] (the fraction of channels or layers that train)")
  every = e.reselect_every
  if every != "never" and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
    fail("efqat.reselect_every", every, "an integer >= 1 (steps), or 'never' or 0 (rank once)")
  if isinstance(e.bucket, bool) or not isinstance(e.bucket, int) or e.bucket < 1:
    fail("efqat.bucket", e.bucket, "a positive integer")
  if not isinstance(e.train_frozen_scales, bool):
    fail("efqat.train_frozen_scales", e.train_frozen_scales, "True or False")


def run_pipeline(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Runs the configured stages in order; returns the results of every finished stage."""
  validate(config)
  run = Run(config, workdir)
  stages = stage_list(config)
  for stage in STAGE_INPUTS:  # before any work: a changed config must not reuse a checkpoint
    if (run.workdir / "stage_configs" / f"{stage}.json").exists():
      run.check_stage_config(stage)
  run.quantized_model  # noqa: B018 (built now: a bad layer pattern fails before training)
  fp_state = run_fp(run)  # later stages start from it: trained once, then restored
  export = "export" in stages
  # A finished qat/efqat stage is restored for export even when not listed again.
  trained = [s for s in ("qat", "efqat") if s in stages or (export and s in run.results)]
  if trained or export or "ptq" in stages:
    # On the host: qat and efqat each start from it, and their steps donate device buffers.
    variables = ptq_variables = jax.device_get(run_ptq(run, fp_state))
  for stage in trained:
    train = run_qat if stage == "qat" else run_efqat
    variables = jax.device_get(train(run, ptq_variables).variables)
  if export:
    run_export(run, variables)
  return run.results
