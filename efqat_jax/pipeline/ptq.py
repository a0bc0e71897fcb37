"""Stage ``ptq``: choose every layer's formats, calibrate, and quantize the weights with the
registered PTQ method ``config.ptq.method``.

Its checkpoint stores the calibrated, quantized variables and, with them, the per-layer formats;
the stages after it rebuild the quantized model from those formats. Its result reports the share
of zero weights per layer; a layer whose weights are all zero stops the stage before its
checkpoint is written, unless ``config.ptq.allow_zeroed_layers``.
"""

from __future__ import annotations

import itertools
import math
import re
import time

import jax
import optax
import tqdm

from efqat_jax.errors import ConfigError, NonFiniteError
from efqat_jax.fields import Field, boolean, integer, one_of, regex
from efqat_jax.nn import QUANT_STATS, QuantRule, export_integer, quantize, quantized_layers
from efqat_jax.nn.formats import Formats, bits_summary, layer_formats
from efqat_jax.nn.intercept import quantizable_paths
from efqat_jax.nn.layer_table import QuantizedLayer
from efqat_jax.nn.ops import WEIGHT_ESTIMATORS
from efqat_jax.pipeline.accumulators import accumulator_report
from efqat_jax.pipeline.context import Run
from efqat_jax.pipeline.mixed_bits import (
  MIXED_FIELDS,
  bits_report,
  check_budget,
  mixed_weight_bits,
  print_bits,
)
from efqat_jax.pipeline.stage import STAGES, ModelState, Stage
from efqat_jax.pipeline.zero_weights import (
  check_zeroed_layers,
  zero_weight_shares,
  zero_weights_line,
  zeroed_layers,
)
from efqat_jax.ptq import calibrate
from efqat_jax.ptq.methods import PTQ_METHODS, quantize_weights
from efqat_jax.ptq.mixed_precision import with_weight_bits
from efqat_jax.quant import QuantSpec
from efqat_jax.train import create_train_state, replicate
from efqat_jax.trees import all_finite, merge_trees

QUANT_FIELDS = {
  "weight_bits": Field(4, "weight bits of every layer but the high-precision ones", integer(2, 16)),
  "act_bits": Field(4, "input-activation bits of those layers", integer(2, 16)),
  "high_precision_bits": Field(
    8, "weight and input bits of the high-precision layers", integer(2, 16)
  ),
  "high_precision_layers": Field(
    "auto",
    "'auto': first and last layer; '': none; or a regex of layer paths",
    regex("'auto', '' or "),
  ),
  "weight_estimator": Field(
    "mse", "weight ranges at calibration: mse or minmax", one_of(*WEIGHT_ESTIMATORS)
  ),
  "quantize_embeddings": Field(
    False, "True: nn.Embed tables per row at weight_bits (else float)", boolean()
  ),
}


def ptq_schema() -> dict:
  """``config.ptq``: calibration, the method, and each registered method's own block."""
  schema = {
    "calibration_batches": Field(8, "training batches the ranges are calibrated on", integer(1)),
    "method": Field(
      "rtn", f"PTQ method: one of {list(PTQ_METHODS.names())}", one_of(*PTQ_METHODS.names())
    ),
    "allow_zeroed_layers": Field(
      False,
      "True: keep a result in which a layer's weights are all zero (e.g. an accumulator too"
      " narrow for it); False: stop with an error naming the layers",
      boolean(),
    ),
  }
  return schema | {name: m.fields for name, m in PTQ_METHODS.items() if m.fields}


def _embeddings_and_layers(run: Run, inputs) -> tuple[list[str], list[str]]:
  """``(embedding tables, layers to quantize)`` of the model, in call order."""
  kinds = quantizable_paths(run.model, inputs, train=False)
  embeddings = [p for p, kind in kinds.items() if kind == "Embed"]
  quantize_embeddings = run.config.quant.quantize_embeddings
  return embeddings, [p for p in kinds if quantize_embeddings or p not in embeddings]


def high_precision_paths(run: Run, paths: list[str]) -> tuple[str, list[str]]:
  """``(regex, paths)`` of the layers among ``paths`` (the layers to quantize, in call order)
  at ``high_precision_bits`` (none for ``''``)."""
  q = run.config.quant
  pattern = q.high_precision_layers
  if not pattern:
    return "", []
  if pattern == "auto":
    pattern = "|".join(re.escape(p) for p in dict.fromkeys([paths[0], paths[-1]]))
  high = [p for p in paths if re.fullmatch(pattern, p)]
  if not high:
    raise ConfigError(
      f"config.quant.high_precision_layers = {q.high_precision_layers!r} matches no layer of"
      f" {run.config.model!r}; its layers are {paths}"
    )
  return pattern, high


def high_precision_layers(run: Run) -> list[str]:
  """The paths of the layers the config keeps at ``high_precision_bits``."""
  return high_precision_paths(run, _embeddings_and_layers(run, run.sample_inputs)[1])[1]


def config_rules(run: Run, inputs) -> list[QuantRule]:
  """All layers at the configured bits; ``high_precision_layers`` (default: the first and
  the last layer in call order) at ``high_precision_bits``; embedding tables in float unless
  ``quantize_embeddings`` (a lookup does no multiply-accumulate)."""
  q = run.config.quant
  embeddings, paths = _embeddings_and_layers(run, inputs)
  float_rules = []
  if embeddings and not q.quantize_embeddings:
    float_rules = [QuantRule.keep_float("|".join(re.escape(p) for p in embeddings))]
  rules = [
    *float_rules,
    QuantRule(
      ".*", weight=QuantSpec.for_weights(q.weight_bits), input=QuantSpec.for_activations(q.act_bits)
    ),
  ]
  pattern, high = high_precision_paths(run, paths)
  if not high:
    return rules
  bits = q.high_precision_bits
  high_rule = QuantRule(
    pattern, weight=QuantSpec.for_weights(bits), input=QuantSpec.for_activations(bits)
  )
  return [*float_rules, high_rule] if len(high) == len(paths) else [high_rule, *rules]


def config_layers(run: Run, inputs) -> dict[str, QuantizedLayer]:
  """The quantized layers the config's rules give the model, in call order (traced
  abstractly)."""
  qmodel = quantize(run.model, config_rules(run, inputs))
  variables = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), inputs, train=False))
  return quantized_layers(qmodel, variables, inputs, train=False)


def config_formats(run: Run, inputs) -> Formats:
  """The per-layer formats the config's rules give the model (traced abstractly)."""
  return layer_formats(config_layers(run, inputs))


def method_formats(run: Run, base: Formats) -> Formats:
  """The per-layer formats the configured method gives a model configured with ``base`` (e.g.
  an accumulator constraint), checked against the method's settings."""
  cfg = run.config.ptq
  method = PTQ_METHODS.get(cfg.method)
  settings = cfg.get(cfg.method)
  formats = method.formats_for(settings, base)
  if method.check is not None:
    method.check(settings, formats)
  return formats


def mixed_formats(run: Run, formats: Formats, fp: ModelState, batches: list[dict]) -> Formats:
  """``formats`` with each layer's weight bits from ``config.quant.mixed_precision``, printed."""
  q = run.config.quant
  qmodel = run.quantized_model(formats)
  variables = merge_trees(run.init(qmodel), fp.variables)
  layers = quantized_layers(qmodel, variables, run.sample_inputs, train=False)
  fixed = high_precision_layers(run)
  bits = mixed_weight_bits(q, qmodel, variables, layers, fixed, batches, run.mesh)
  print_bits(bits_report(q, bits, layers, fixed), q.mixed_precision)
  return with_weight_bits(formats, bits)


def check_ptq(run: Run) -> None:
  check_budget(run.config.quant)
  method_formats(run, config_formats(run, run.placeholder_inputs()))


def quantize_model(run: Run, fp: ModelState) -> ModelState:
  """Calibrates the quantized model on ``calibration_batches`` batches, then quantizes its
  weights with the configured method."""
  cfg = run.config.ptq
  method = PTQ_METHODS.get(cfg.method)
  settings = cfg.get(cfg.method)
  wanted = cfg.calibration_batches
  if method.samples is not None:
    wanted = max(wanted, math.ceil(method.samples(settings) / run.config.batch_size))
  data = list(itertools.islice(run.train_batches(0), wanted))
  formats = config_formats(run, run.sample_inputs)
  if run.config.quant.mixed_precision:
    formats = mixed_formats(run, formats, fp, data[: cfg.calibration_batches])
  formats = method_formats(run, formats)
  qmodel = run.quantized_model(formats)
  variables = merge_trees(run.init(qmodel), fp.variables)
  batches = [b["inputs"] for b in data]
  inputs = batches[: cfg.calibration_batches]
  bar = tqdm.tqdm(
    total=cfg.calibration_batches,
    desc="ptq calibrate",
    disable=not run.config.progress,
    leave=False,
  )
  calibrated = calibrate(
    qmodel,
    variables,
    inputs,
    cfg.calibration_batches,
    train=False,
    progress=lambda done: bar.update(done - bar.n),
  )
  bar.close()
  # The running ranges are a by-product: the checkpoint holds what the model runs with.
  variables = {k: v for k, v in calibrated.items() if k != QUANT_STATS}
  if not all_finite(variables["params"]):
    raise NonFiniteError(
      "ptq: calibration gave non-finite ranges (non-finite values in the training data?)"
    )
  layers = quantized_layers(qmodel, variables, run.sample_inputs, train=False)
  capture = method.capture_for(qmodel, variables, batches, settings, train=False)
  bar = tqdm.tqdm(
    total=len(layers), desc=f"ptq {cfg.method}", disable=not run.config.progress, leave=False
  )
  params = quantize_weights(
    method, variables["params"], layers, settings, capture, lambda _: bar.update()
  )
  bar.close()
  if not all_finite(params):
    raise NonFiniteError(f"ptq: {cfg.method} gave non-finite weights")
  quantized = {**variables, "params": params}
  exported = export_integer(qmodel, quantized, run.sample_inputs, train=False)
  check_zeroed_layers(cfg, zero_weight_shares(exported))
  return ModelState(jax.device_get(quantized), formats)


def run_ptq(run: Run, inputs: dict[str, ModelState]) -> ModelState:
  start = time.perf_counter()
  # A first run quantizes before its checkpoint directory exists: an error leaves nothing.
  out = None if (run.workdir / "ptq").exists() else quantize_model(run, inputs["fp"])
  with run.checkpointer("ptq") as ckpt:
    if ckpt.latest_step() is None:
      if out is None:
        out = quantize_model(run, inputs["fp"])
      ckpt.save(0, out.variables, metadata={"formats": out.formats}, wait=True)
    else:
      variables, metadata = ckpt.restore_latest_with_metadata(None)
      out = ModelState(variables, metadata["formats"])
  if "ptq" not in run.results:
    qmodel = run.quantized_model(out.formats)
    state = replicate(create_train_state(out.variables, optax.identity()), run.mesh)
    result = run.evaluate(qmodel, state, "ptq")
    exported = export_integer(qmodel, out.variables, run.sample_inputs, train=False)
    shares = zero_weight_shares(exported)
    check_zeroed_layers(run.config.ptq, shares)
    print(zero_weights_line(run.config.ptq.method, shares), flush=True)
    widths = accumulator_report(exported, out.formats)
    if run.config.quant.mixed_precision:
      layers = quantized_layers(qmodel, out.variables, run.sample_inputs, train=False)
      bits = {p: spec["weight"]["bits"] for p, spec in out.formats.items()}
      widths |= bits_report(run.config.quant, bits, layers, high_precision_layers(run))
    run.record(
      "ptq",
      {
        **result,
        "wall_time_s": time.perf_counter() - start,
        "method": run.config.ptq.method,
        "formats": bits_summary(out.formats),
        "zero_weight_share": shares,
        "zeroed_layers": zeroed_layers(shares),
        **widths,
      },
    )
  return out


PTQ = STAGES.register(
  "ptq",
  Stage(
    run=run_ptq,
    needs=lambda config, finished: ("fp",),
    fields=lambda config: ("quant", "ptq"),
    summary="calibrate the ranges and quantize the weights (config.ptq.method)",
    blocks=lambda: {"quant": QUANT_FIELDS | MIXED_FIELDS, "ptq": ptq_schema()},
    check=check_ptq,
  ),
)
