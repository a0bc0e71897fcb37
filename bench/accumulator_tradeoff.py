"""Accuracy against accumulator width P: naive bit-width reduction vs AXE-OPTQ and AXE-GPFQ,
each with one accumulator per output channel and with tiles of 64 inputs (multi-stage), and
EfQAT fine-tuning from the AXE model at the tightest P that works.

Settings: ResNet-20 on mnist5k and the Transformer char-LM (configs/<model>.py), at W4A4 and
W4A8 with every layer at those widths (no high-precision layers, so every layer's accumulator
counts). For each P, from where nothing binds (the model's data-type bound) down to where
everything fails:
- ``naive_weights`` / ``naive_inputs``: round-to-nearest with the weight (or input) bits of every
  layer lowered until the data-type bound of every layer fits P (per tile with tiles): overflow-free
  by construction; metric None where even 2 bits do not fit.
- ``axe_optq`` / ``axe_gpfq``: the registered PTQ methods at ``accumulator_bits = P``.
``overflow_free`` is the exact check of the PTQ result (``efqat_jax.quant.integer``); with tiles,
the outer accumulator needs ``P + ceil(log2(tiles))`` bits (``outer_bits``). EfQAT (rho 0.1, QAT's
steps and optimizer) then fine-tunes the best AXE variant at the tightest P whose metric is
within 2 points (0.05 bits/char) of its widest-P metric; the export proves it still fits.

  python bench/accumulator_tradeoff.py                       # all settings (long)
  python bench/accumulator_tradeoff.py --settings=resnet20_mnist5k_w4a4
  python bench/accumulator_tradeoff.py --quick               # ResNet-8, 3 widths, short fp (~10 min)
  python bench/accumulator_tradeoff.py --plots-only

Runs resume: each keeps its results under --root and is skipped once finished.
"""

from __future__ import annotations

import math
import pathlib

import jax
import sweep
from stage_runs import run_stage, seeded_workdir, stage_results

from efqat_jax import pipeline
from efqat_jax.nn import quantized_layers
from efqat_jax.pipeline.ptq import config_formats
from efqat_jax.quant import QuantSpec
from efqat_jax.quant.accumulator import datatype_bound
from efqat_jax.quant.rows import kernel_axes

SETTINGS = (
  ("resnet20_mnist5k", 4, 4),
  ("resnet20_mnist5k", 4, 8),
  ("transformer_shakespeare", 4, 4),
  ("transformer_shakespeare", 4, 8),
)
AXE = ("axe_optq", "axe_gpfq")
NAIVE = ("naive_weights", "naive_inputs")
TILES = (0, 64)
WIDTHS = 6  # accumulator widths per setting, 2 bits apart, from the data-type bound down
TOLERANCE = {"accuracy": 2.0, "bits_per_char": 0.05}
COLUMNS = [
  "model", "weight_bits", "act_bits", "method", "accumulator_bits", "tile", "metric_name",
  "metric", "overflow_free", "used_bits", "outer_bits",
]  # fmt: skip


SETTING_NAMES = [sweep.setting_name(*s) for s in SETTINGS]


def base_config(setting, root: pathlib.Path, quick: bool):
  config = sweep.setting_config(setting, root)
  config.quant.high_precision_layers = ""
  config.ptq.calibration_batches = 4
  if quick:
    config.model_kwargs.depth = 8
    config.fp.steps, config.efqat.steps = 150, 30
  return config


def layer_inputs(run) -> list[int]:
  """Inputs per output channel (K) of every quantized layer."""
  inputs = run.sample_inputs
  formats = config_formats(run, inputs)
  qmodel = run.quantized_model(formats)
  variables = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), inputs, train=False))
  ks = []
  for layer in quantized_layers(qmodel, variables, inputs, train=False).values():
    op = dict(layer.op)
    _, in_axes = kernel_axes(op["op"], op["dimension_numbers"], len(layer.weight_shape))
    ks.append(math.prod(layer.weight_shape[a] for a in in_axes))
  return ks


def naive_bits(ks, bits: int, tile: int, weight_bits: int, act_bits: int, lower: str):
  """The (weight, input) bits of naive reduction at accumulator width ``bits``, or None."""
  fits = lambda m, n: all(
    datatype_bound(min(tile or k, k), QuantSpec.for_activations(n), m) <= bits for k in ks
  )
  for b in range(weight_bits if lower == "weights" else act_bits, 1, -1):
    m, n = (b, act_bits) if lower == "weights" else (weight_bits, b)
    if fits(m, n):
      return m, n
  return None


def ptq_result(config, workdir: pathlib.Path, fp) -> dict:
  """``results["ptq"]`` of the run in ``workdir`` (run unless finished)."""
  return stage_results(config, workdir, fp, ("ptq",))["ptq"]


def run_setting(setting, root: pathlib.Path, quick: bool) -> list[dict]:
  model, weight_bits, act_bits = setting
  config = base_config(setting, root, quick)
  metric_name = sweep.metric_name_of(config)
  fp_run = pipeline.Run(config, root / model)
  fp = run_stage(fp_run, "fp", {})
  ks = layer_inputs(fp_run)
  widest = max(datatype_bound(k, QuantSpec.for_activations(act_bits), weight_bits) for k in ks)
  widths = [widest - 2 * i for i in range(3 if quick else WIDTHS)]
  base = dict(model=model, weight_bits=weight_bits, act_bits=act_bits, metric_name=metric_name)
  name = sweep.setting_name(*setting)
  reference = ptq_result(config, root / name / "rtn", fp)
  rows = [
    dict(
      base, method="fp", accumulator_bits=None, tile=0,
      metric=sweep.metric_of(fp_run.results["fp"], metric_name), overflow_free=None, used_bits=None,
      outer_bits=None,
    ),
    dict(
      base, method="rtn", accumulator_bits=reference["accumulator_needed_bits"], tile=0,
      metric=sweep.metric_of(reference, metric_name), overflow_free=True,
      used_bits=f"W{weight_bits}A{act_bits}", outer_bits=None,
    )
  ]  # fmt: skip
  ptq_states = {}
  for bits in widths:
    for tile in TILES:
      outer = None if not tile else bits + math.ceil(math.log2(math.ceil(max(ks) / tile)))
      for method in NAIVE:
        chosen = naive_bits(ks, bits, tile, weight_bits, act_bits, method.split("_")[1])
        metric = None
        if chosen is not None:
          cfg = config.copy_and_resolve_references()
          cfg.quant.update(weight_bits=chosen[0], act_bits=chosen[1])
          workdir = root / name / f"rtn_w{chosen[0]}a{chosen[1]}"
          metric = sweep.metric_of(ptq_result(cfg, workdir, fp), metric_name)
        rows.append(
          dict(
            base, method=method, accumulator_bits=bits, tile=tile, metric=metric,
            overflow_free=None if chosen is None else True, outer_bits=outer,
            used_bits=None if chosen is None else f"W{chosen[0]}A{chosen[1]}",
          )
        )  # fmt: skip
      for method in AXE:
        cfg = config.copy_and_resolve_references()
        cfg.ptq.method = method
        cfg.ptq[method].update(accumulator_bits=bits, accumulator_tile=tile)
        workdir = root / name / f"{method}_p{bits}_t{tile}"
        result = ptq_result(cfg, workdir, fp)
        ptq_states[method, bits, tile] = (cfg, workdir)
        rows.append(
          dict(
            base, method=method, accumulator_bits=bits, tile=tile,
            metric=sweep.metric_of(result, metric_name), overflow_free=result["overflow_free"],
            used_bits=f"W{weight_bits}A{act_bits}", outer_bits=outer,
          )
        )  # fmt: skip
      print(f"{name}: P={bits} T={tile} done", flush=True)
  rows.append(efqat_row(rows, ptq_states, base, metric_name, config))
  return rows


def tightest_working(rows: list[dict], metric_name: str):
  """``(method, bits, tile)`` of the AXE run at the smallest P within tolerance of its own
  widest-P metric (the best metric among ties)."""
  better = (lambda a, b: a < b) if metric_name == "bits_per_char" else (lambda a, b: a > b)
  best = None
  for method in AXE:
    for tile in TILES:
      runs = sorted(
        (r for r in rows if r["method"] == method and r["tile"] == tile),
        key=lambda r: r["accumulator_bits"],
      )
      target = runs[-1]["metric"]
      ok = [r for r in runs if abs(r["metric"] - target) <= TOLERANCE[metric_name]]
      candidate = ok[0]
      if (
        best is None
        or candidate["accumulator_bits"] < best["accumulator_bits"]
        or (
          candidate["accumulator_bits"] == best["accumulator_bits"]
          and better(candidate["metric"], best["metric"])
        )
      ):
        best = candidate
  return best["method"], best["accumulator_bits"], best["tile"]


def efqat_row(rows, ptq_states, base, metric_name, config) -> dict:
  """EfQAT (rho 0.1, QAT's steps and optimizer) from the tightest working AXE model, exported
  and checked, in a workdir of its own seeded with that model's PTQ run."""
  method, bits, tile = tightest_working(rows, metric_name)
  cfg, ptq_workdir = ptq_states[method, bits, tile]
  workdir = seeded_workdir(ptq_workdir, ptq_workdir.with_name(f"{ptq_workdir.name}_efqat"))
  cfg = cfg.copy_and_resolve_references()
  cfg.efqat.update({k: v for k, v in config.qat.to_dict().items() if k != "method"})
  cfg.efqat.update(rho=0.1, steps=config.efqat.steps)
  cfg.export.source = "efqat"
  results = stage_results(cfg, workdir, None, ("ptq", "efqat", "export"))
  return dict(
    base, method=f"{method}+efqat", accumulator_bits=bits, tile=tile,
    metric=sweep.metric_of(results["efqat"], metric_name),
    overflow_free=results["export"]["overflow_free"], used_bits=None, outer_bits=None,
  )  # fmt: skip


def plot(rows: list[dict], stem: str) -> None:
  if not sweep.plotting_ready():
    return

  groups = sweep.grouped(rows, sweep.setting_title)
  fig, axes = sweep.panel_grid(len(groups), max_columns=len(groups))
  for ax, (title, group) in zip(axes, groups.items(), strict=True):
    for method in (*NAIVE, *AXE):
      for tile, style in zip(TILES, ("-", "--"), strict=True):
        points = sorted(
          (r["accumulator_bits"], r["metric"])
          for r in group
          if r["method"] == method and r["tile"] == tile and r["metric"] is not None
        )
        if points:
          label = f"{method}" + (f" T={tile}" if tile else "")
          ax.plot(*zip(*points, strict=True), "o" + style, label=label, markersize=3)
    for r in group:
      if r["method"] == "rtn":
        ax.axhline(r["metric"], color="k", ls=":", label="rtn (wide accumulator)")
      elif r["method"].endswith("+efqat"):
        ax.scatter(
          r["accumulator_bits"], r["metric"], marker="*", s=150, color="k", label=r["method"]
        )
    ax.set_title(title)
    ax.set_xlabel("accumulator bits P")
    ax.set_ylabel(group[0]["metric_name"])
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=6)
  sweep.save_figure(fig, stem)


def main():
  args = sweep.parse(__doc__, "accumulator_tradeoff", SETTING_NAMES, "ResNet-8 W4A4, 3 widths")
  sweep.run(args, SETTINGS, SETTING_NAMES, run_setting, COLUMNS, sweep.row_setting, plot)


if __name__ == "__main__":
  main()
