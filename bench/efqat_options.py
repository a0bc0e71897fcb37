"""EfQAT's options compared on gap recovery at rho 10%, 3 seeds: where the cheap params train
(``efqat.cheap_params``), how channels and layers are ranked (``efqat.importance``) or EfQAT's
learning rate as a multiple of QAT's (``learning_rate``: 1x, 2x, 4x, 8x), with rho counting channels
and layers, weights or work (``efqat.rho_unit``).

Per setting and seed, the float model, PTQ and QAT run once (``config.seed`` seeds init, data
order and dropout, so every seed has its own float and PTQ model); then EfQAT in each mode
(cwpl, cwpn, lwpn) at rho 10% with each value of the option, each from a copy of that seed's
workdir (same PTQ model, same step budget as QAT).

  gap_recovered = (efqat - ptq) / (qat - ptq)

per seed (for bits per character, lower is better, the same ratio); the table gives the mean
and the [min, max] over seeds. A difference between two values counts only where their ranges
do not overlap: ``versus_first`` compares each value with the option's first in the same rho
unit, ``versus_blocks`` a value's params and work rows with its blocks rows. ``train_time_s`` is
the stage's wall time before its final evaluation (compilation and re-selection included).

A learning rate k times QAT's is compared with QAT at its own rate (``gap_recovered``) and with
QAT at k times it too (``qat_same_lr``, ``gap_recovered_same_lr``; each seed's QAT runs again at
that rate), so a gain that QAT would make as well with the larger rate is not credited to EfQAT.
Every row records the config's QAT rate it ran with (``qat_learning_rate``); a second table
gives each method's metric at every rate and its best.

  python bench/efqat_options.py --option=cheap_params    # writes results/efqat_cheap_params.json
  python bench/efqat_options.py --option=importance      # writes results/efqat_importance.json
  python bench/efqat_options.py --option=importance --settings=transformer_shakespeare_w4a4 \
      --values=mean_abs,fan_in --seeds=0,1
  python bench/efqat_options.py --option=learning_rate  # 1x-8x; writes efqat_learning_rate.json

``--values`` picks some of the option's values (e.g. no ``bn_folded`` for a model without
BatchNorm, where it equals mean_abs). ``--rho-unit`` sets what rho counts (default: work, the
pipeline's; params: weights; blocks: channels and layers, the paper's). Counted in weights or
work, values that rank blocks of different sizes first train about the same share. cwpl selects
the same channels in every unit, so its runs are always in blocks (a params or work run resumes
them):

  python bench/efqat_options.py --option=importance --values=bn_folded,ptq_error --rho-unit=blocks

``--importance`` sets the ranking of the cheap_params runs (default: the pipeline's, bn_folded;
mean_abs, the ranking before it, for models without BatchNorm, whose importance runs were made
with that name):

  python bench/efqat_options.py --option=cheap_params --settings=transformer_shakespeare_w4a4 \
      --importance=mean_abs --rho-unit=params

Rows of other settings, and of values, rankings or rho units not run, already in the JSON are
kept. Reruns resume: every run keeps its workdir under --root (default /tmp/efqat_options), named
by its mode, ranking, cheap params and rho unit, so the two options share the runs they have in
common (cheap_params=all_layers is the importance run of the same ranking); finished stages are
read back, not run again. A run whose config has changed since (e.g. a config's learning rate)
stops at the pipeline's fingerprint check, which names what to delete; or pass a new --root.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import subprocess
import sys

import sweep
import timing
from reference_results import load_config

from efqat_jax.config import base_config
from efqat_jax.efqat import CHEAP_PARAMS, RHO_UNITS
from efqat_jax.pipeline.qat_efqat import PIPELINE_IMPORTANCES

ROOT = pathlib.Path(__file__).resolve().parent.parent
SETTINGS = {
  "cnn_mnist5k_w2a2": ("cnn_mnist5k", 2),
  "resnet20_mnist5k_w2a2": ("resnet20_mnist5k", 2),
  "transformer_shakespeare_w4a4": ("transformer_shakespeare", 4),
}
# each option's values, the one the others are compared with first: the paper's reading (for
# cheap_params also the default; importance's default is bn_folded)
OPTIONS = {
  "cheap_params": CHEAP_PARAMS,
  "importance": PIPELINE_IMPORTANCES,
  "learning_rate": ("1x", "2x", "4x", "8x"),  # EfQAT's, a multiple of QAT's (QAT runs at it too)
}
CHEAP_DEFAULT = base_config().efqat.cheap_params
MODES = ("cwpl", "cwpn", "lwpn")
RHO = 0.1


def _run(config: str, bits: int, workdir: pathlib.Path, *overrides: str) -> dict:
  """Runs the command line on ``workdir`` and returns its results.json."""
  command = [
    sys.executable,
    "-m",
    "efqat_jax.main",
    f"--config={ROOT / 'configs' / config}.py",
    f"--workdir={workdir}",
    "--config.progress=False",
    f"--config.quant.weight_bits={bits}",
    f"--config.quant.act_bits={bits}",
    *overrides,
  ]
  subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
  return json.loads((workdir / "results.json").read_text())


def _metric(result: dict) -> str:
  """The setting's metric: bits per character for a language model (which also records its
  next-character accuracy), else accuracy."""
  return "bits_per_char" if "bits_per_char" in result else "accuracy"


def _workdir(
  base: pathlib.Path, mode: str, importance: str, cheap_params: str, unit: str, lr_scale: str
):
  """An EfQAT run's workdir, named by everything that varies between the runs of one base, so
  the options share the runs they have in common."""
  cheap = "" if cheap_params == "all_layers" else f"_{cheap_params}"
  lr = "" if lr_scale == "1x" else f"_lr{lr_scale}"
  return base.parent / (
    f"{base.name}_{mode}_{importance}{cheap}{'' if unit == 'blocks' else '_' + unit}{lr}"
  )


def _scale(lr_scale: str) -> float:
  """``"2x"`` -> 2.0."""
  return float(lr_scale.removesuffix("x"))


def _qat_at(config: str, bits: int, seed: int, base: pathlib.Path, lr: float, lr_scale: str):
  """The results of QAT from ``base``'s PTQ model with learning rate ``lr`` (``lr_scale`` times
  the config's)."""
  workdir = base.parent / f"{base.name}_qat_lr{lr_scale}"
  if not workdir.exists():  # the base's fp and ptq stages, without the qat it ran
    outputs = ("qat", "qat.json", "efqat", "efqat.json", "export")
    shutil.copytree(base, workdir, ignore=shutil.ignore_patterns(*outputs))
    results = json.loads((workdir / "results.json").read_text())
    results.pop("qat")
    (workdir / "results.json").write_text(json.dumps(results))
  overrides = (f"--config.seed={seed}", "--config.stages=fp,ptq,qat")
  return _run(config, bits, workdir, *overrides, f"--config.qat.learning_rate={lr}")["qat"]


def _seed_rows(
  setting: str,
  seed: int,
  option: str,
  values: list[str],
  root: pathlib.Path,
  rho_unit: str,
  importance: str,
):
  config, bits = SETTINGS[setting]
  base = root / f"{config}_w{bits}_s{seed}"
  results = _run(config, bits, base, f"--config.seed={seed}", "--config.stages=fp,ptq,qat")
  metric = _metric(results["ptq"])
  ptq, qat = results["ptq"][metric], results["qat"][metric]
  qat_lr = load_config(config).qat.learning_rate
  choices = {
    value: {"importance": importance, "cheap_params": CHEAP_DEFAULT, "learning_rate": "1x"}
    | {option: value}
    for value in values
  }
  scales = {choice["learning_rate"] for choice in choices.values()} - {"1x"}
  qat_at = {"1x": qat} | {
    k: _qat_at(config, bits, seed, base, _scale(k) * qat_lr, k)[metric] for k in scales
  }
  qat_same_lr = {value: qat_at[choice["learning_rate"]] for value, choice in choices.items()}
  rows = []
  for mode in MODES:
    unit = "blocks" if mode == "cwpl" else rho_unit  # cwpl's selection is the same in both
    for value in values:
      choice = choices[value]
      workdir = _workdir(
        base, mode, choice["importance"], choice["cheap_params"], unit, choice["learning_rate"]
      )
      if not workdir.exists():
        shutil.copytree(base, workdir, ignore=shutil.ignore_patterns("qat", "export"))
      efqat = _run(
        config,
        bits,
        workdir,
        f"--config.seed={seed}",
        "--config.stages=fp,ptq,efqat",
        f"--config.efqat.mode={mode}",
        f"--config.efqat.rho={RHO}",
        f"--config.efqat.importance={choice['importance']}",
        f"--config.efqat.cheap_params={choice['cheap_params']}",
        f"--config.efqat.rho_unit={unit}",
        f"--config.efqat.learning_rate={_scale(choice['learning_rate']) * qat_lr}",
      )["efqat"]
      rows.append(
        dict(
          setting=setting,
          seed=seed,
          mode=mode,
          option=option,
          value=value,
          rho_unit=efqat["rho_unit"],
          importance=efqat["importance"],
          metric=metric,
          ptq=ptq,
          qat=qat,
          efqat=efqat[metric],
          gap_recovered=(efqat[metric] - ptq) / (qat - ptq),
          qat_learning_rate=qat_lr,  # the config's; EfQAT's is learning_rate_scale times it
          learning_rate_scale=_scale(choice["learning_rate"]),
          qat_same_lr=qat_same_lr[value],
          gap_recovered_same_lr=(efqat[metric] - ptq) / (qat_same_lr[value] - ptq),
          param_fraction=efqat["param_fraction"],
          work_fraction=efqat.get("work_fraction"),
          qat_train_time_s=results["qat"].get("train_time_s"),
          train_time_s=efqat.get("train_time_s"),
          **timing.machine(),
        )
      )
  return rows


def _span(values: list[float], fmt=lambda v: f"{v:.2f}") -> str:
  """``"mean [min, max]"`` of ``values``."""
  return f"{fmt(statistics.mean(values))} [{fmt(min(values))}, {fmt(max(values))}]"


def _shown(metric_name: str):
  """How a metric is shown: accuracy in % to 1 place, bits per character to 3."""
  if metric_name == "accuracy":
    return 100, lambda v: f"{v:.1f}"
  return 1, lambda v: f"{v:.3f}"


def _mean_or_blank(values: list) -> str:
  """The mean of ``values`` to 3 places, or "" where rows predate the field."""
  return "" if None in values else f"{statistics.mean(values):.3f}"


def _ranking(row: dict) -> str:
  """The importance a row's run ranked by; rows written before it was recorded: the value in
  the importance bench, else mean_abs (the default then)."""
  return row.get("importance") or (row["value"] if row["option"] == "importance" else "mean_abs")


def _held(row: dict) -> tuple:
  """What the comparisons of a row hold fixed: setting, rho unit, mode, and the ranking where
  the option is not the ranking itself."""
  ranking = None if row["option"] == "importance" else _ranking(row)
  return row["setting"], sweep.rho_unit(row), row["mode"], ranking


def _row_key(row: dict) -> tuple:
  return row["setting"], _ranking(row), row["value"], sweep.rho_unit(row), row["mode"]


def _summary(rows: list[dict], first: str) -> list[dict]:
  """Mean and [min, max] over seeds per setting, rho unit, mode and value, with the verdicts
  against the option's first value in the same setting, rho unit and mode, and (params and
  work rows) against the same value with rho in blocks."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault((_held(row), row["value"]), []).append(row)
  recovered = {key: [r["gap_recovered"] for r in group] for key, group in groups.items()}
  out = []
  for (held, value), group in groups.items():
    setting, unit, mode, ranking = held
    scale, fmt = _shown(group[0]["metric"])
    metric = [scale * r["efqat"] for r in group]
    gaps = [scale * (r["qat"] - r["ptq"]) for r in group]
    ours = recovered[held, value]
    base = recovered.get((held, first))
    blocks = (
      recovered.get(((setting, "blocks", mode, ranking), value)) if unit != "blocks" else None
    )
    same_lr = {}
    if group[0]["option"] == "learning_rate":
      qat_same = [scale * r["qat_same_lr"] for r in group]
      same = [r["gap_recovered_same_lr"] for r in group]
      same_lr = dict(
        qat_same_lr=_span(qat_same, fmt),
        gap_recovered_same_lr=_span(same),
      )
    out.append(
      dict(
        setting=setting,
        importance=ranking or value,
        rho_unit=unit,
        mode=mode,
        value=value,
        seeds=len(group),
        qat_rate=f"{group[0]['qat_learning_rate']:g}",
        qat_minus_ptq=_span(gaps, fmt),
        metric=_span(metric, fmt),
        param_fraction=_mean_or_blank([r.get("param_fraction") for r in group]),
        work_fraction=_mean_or_blank([r.get("work_fraction") for r in group]),
        gap_recovered=_span(ours),
        versus_first="" if value == first or base is None else sweep.verdict(ours, base),
        versus_blocks="" if blocks is None else sweep.verdict(ours, blocks),
        **same_lr,
      )
    )
  return out


def _rate_grid(rows: list[dict]) -> list[dict]:
  """The learning-rate rows as one grid per setting: QAT's and each mode's metric, mean
  [min, max] over seeds, at each rate; the best rate by mean, and whether it beats the next best
  beyond both spreads (``sweep.verdict``)."""
  cells = {}  # (setting, metric name, method) -> rate -> seed -> metric
  for row in rows:
    for method, metric in ((row["mode"], row["efqat"]), ("qat", row["qat_same_lr"])):
      at_rate = cells.setdefault((row["setting"], row["metric"], method), {})
      at_rate.setdefault(row["value"], {})[row["seed"]] = metric
  out = []
  for (setting, metric_name, method), at_rate in cells.items():
    lower = metric_name == "bits_per_char"
    scale, fmt = _shown(metric_name)
    seeds = {rate: list(by_seed.values()) for rate, by_seed in at_rate.items()}
    ranked = sorted(seeds, key=lambda k: statistics.mean(seeds[k]), reverse=not lower)
    versus = "" if len(ranked) < 2 else sweep.verdict(seeds[ranked[0]], seeds[ranked[1]], lower)
    spans = {
      rate: _span([scale * v for v in seeds[rate]], fmt) if rate in seeds else ""
      for rate in OPTIONS["learning_rate"]
    }
    out.append(
      dict(setting=setting, method=method, **spans, best=ranked[0], best_versus_next=versus)
    )
  methods = ["qat", *MODES]
  return sorted(out, key=lambda r: (list(SETTINGS).index(r["setting"]), methods.index(r["method"])))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--option", required=True, choices=list(OPTIONS))
  parser.add_argument("--values", help="comma list of the option's values (default: all)")
  parser.add_argument(
    "--settings", default="cnn_mnist5k_w2a2,resnet20_mnist5k_w2a2", help=f"of {', '.join(SETTINGS)}"
  )
  parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
  parser.add_argument("--root", default="/tmp/efqat_options", help="where runs are kept")
  parser.add_argument(
    "--rho-unit",
    default=base_config().efqat.rho_unit,
    choices=RHO_UNITS,
    help="efqat.rho_unit of the cwpn and lwpn runs (cwpl's are in blocks; default: the pipeline's)",
  )
  parser.add_argument(
    "--importance",
    default=base_config().efqat.importance,
    choices=PIPELINE_IMPORTANCES,
    help="efqat.importance of the runs of another option (default: the pipeline's)",
  )
  args = parser.parse_args()
  settings = args.settings.split(",")
  unknown = [s for s in settings if s not in SETTINGS]
  if unknown:
    parser.error(f"unknown settings {unknown}; allowed: {', '.join(SETTINGS)}")
  allowed = OPTIONS[args.option]
  values = args.values.split(",") if args.values else list(allowed)
  if set(values) - set(allowed):
    parser.error(f"--values={args.values}: {args.option} takes {', '.join(allowed)}")
  timing.use_jemalloc()
  root = pathlib.Path(args.root)
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = [
    row
    for setting in settings
    for seed in seeds
    for row in _seed_rows(setting, seed, args.option, values, root, args.rho_unit, args.importance)
  ]
  path = timing.RESULTS / f"efqat_{args.option}.json"
  # the rows of other settings, values, rho units and modes than those run here are kept
  order = [
    (s, ranking, value, unit, mode)
    for s in SETTINGS
    for ranking in PIPELINE_IMPORTANCES
    for value in allowed
    for unit in RHO_UNITS
    for mode in MODES
  ]
  rows = sweep.merged(rows, path, _row_key, order)
  summary = _summary(rows, allowed[0])
  print(timing.markdown_table(summary, list(summary[0])))
  if args.option == "learning_rate":
    grid = _rate_grid(rows)
    print(timing.markdown_table(grid, list(grid[0])))
  print(f"wrote {timing.write_rows(f'efqat_{args.option}', rows)}")


if __name__ == "__main__":
  main()
