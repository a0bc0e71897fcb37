"""Attention Round against round-to-nearest, OPTQ and QAT at the same wall time, with uniform and
mixed-precision weights, and EfQAT from the Attention Round model.

Settings: ResNet-20 and the MobileNetV2-style model on mnist5k, the Transformer char-LM
(configs/<model>.py: first and last layer at 8 bits), at W4 and W3 with A8 and A4. Each bits mode
is a set of per-layer weight widths: ``uniform`` (every other layer at W), ``coding_length``
(Attention Round's mixed precision) and ``sensitivity`` (the baseline: the loss increase of each
layer rounded alone), both mixed ones within the weight memory of ``uniform``. The float model is
trained once per model and root (``fp``: a row in every bits mode, since a run of some bits modes
on a new root trains another one, which once came out different: bench/README.md); each cell
runs with --seeds seeds (Attention Round's minibatches and noise: ``ptq.attention_round.seed``;
QAT's and EfQAT's data order and dropout: ``train_seed``). Per bits mode:
- ``rtn``, ``optq``: the PTQ stage, run once: neither draws random numbers, so every seed has
  the same value (spread 0);
- ``attention_round``: the PTQ stage, once per seed;
- ``attention_round+efqat``: EfQAT (rho 0.1, QAT's optimizer) from each seed's Attention Round
  model; its time is both stages' together;
- ``qat@attention_round``, ``qat@attention_round+efqat``: QAT from the one ``rtn`` model, with as
  many steps as fit in that pipeline's time, charged the ``rtn`` stage too.
The step budgets come from step times measured side by side: QAT's step, EfQAT's step and
Attention Round's Adam step of every block, interleaved in one process. A pipeline's time is its
steps at those step times plus its fixed cost (compilation, calibration, capture passes,
evaluation): the median over runs of a wall time less its steps at the same step times, the runs
being a probe run of a few steps and, for Attention Round and EfQAT, every seed's run:
  attention_round = fixed + steps per block x sum over blocks of its step time
  + efqat         = that + EfQAT's fixed + EfQAT's steps x its step time
  qat steps       = (pipeline time - rtn stage - QAT's fixed) / QAT's step time
The timings, probes and budgets of a bits mode are kept in ``<root>/<setting>/<mode>_budget.json``
(a resumed sweep keeps its budgets). Rows of ``bench/results/attention_round.json``: model,
weight_bits, act_bits, bits_mode, method, steps, metric_name, metric (mean over the seeds of the
accuracy in %, or bits per character), metric_std / _min / _max / _seeds, seeds, versus and
verdict (the row against the method named in ``versus``: better or worse by more than the spread
(max - min) of either, else within spread; ``sweep.differs``), wall_s (measured, median over
the seeds; a pipeline's stages added up), budget_s (the side-by-side estimate the budgets use)
and learning_rate (QAT's and EfQAT's peak rate in the setting's config when the row ran).

  python bench/attention_round.py                         # every setting (long)
  python bench/attention_round.py --settings=resnet20_mnist5k_w3a4 --seeds=5
  python bench/attention_round.py --settings=mobilenetv2_mnist5k_w3a4 --bits-modes=uniform
  python bench/attention_round.py --quick                 # ResNet-8 W4A8, 2 seeds (~22 min)
  python bench/attention_round.py --plots-only            # the tables of bench/README.md, the plot

Runs resume: each keeps its results under --root and is skipped once finished. A run replaces the
rows of the settings and bits modes it ran and keeps the others.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import pathlib
import statistics
from collections.abc import Callable

import jax
import sweep
import timing
from stage_runs import run_stage, stage_results

from efqat_jax import pipeline
from efqat_jax.efqat import freeze_unselected, restrict_backward, set_trainable
from efqat_jax.nn import quantized_layers
from efqat_jax.pipeline.qat_efqat import configured_selection
from efqat_jax.ptq.attention_round import BlockReconstruction
from efqat_jax.ptq.methods import PTQ_METHODS
from efqat_jax.train import (
  classification_loss,
  create_train_state,
  make_optimizer,
  make_train_step,
  replicate,
)

MODELS = ("resnet20_mnist5k", "mobilenetv2_mnist5k", "transformer_shakespeare")
SETTINGS = tuple((m, w, a) for m in MODELS for w in (4, 3) for a in (8, 4))
BITS_MODES = ("uniform", "coding_length", "sensitivity")
PTQ_ONCE = ("rtn", "optq")  # PTQ methods that draw no random numbers: one run serves every seed
AR, AR_EFQAT = "attention_round", "attention_round+efqat"
# Each method's reference in the tables: QAT's is the pipeline whose time it was given.
REFERENCES = {
  "optq": "rtn",
  AR: "optq",
  AR_EFQAT: AR,
  f"qat@{AR}": AR,
  f"qat@{AR_EFQAT}": AR_EFQAT,
}
PROBE_STEPS = {False: 20, True: 5}  # by --quick
ROUNDS = {False: 20, True: 5}
COLUMNS = [
  "model", "weight_bits", "act_bits", "bits_mode", "method", "steps", "metric_name", "metric",
  "metric_std", "metric_min", "metric_max", "seeds", "versus", "verdict", "wall_s", "budget_s",
  "learning_rate",
]  # fmt: skip


SETTING_NAMES = [sweep.setting_name(*s) for s in SETTINGS]


def base_config(setting, root: pathlib.Path, quick: bool):
  config = sweep.setting_config(setting, root)
  if quick:
    config.model_kwargs.depth = 8
    config.fp.steps, config.qat.steps, config.efqat.steps = 150, 30, 30
    config.ptq.attention_round.steps = 20
  return config


def with_bits_mode(config, bits_mode: str):
  config = config.copy_and_resolve_references()
  config.quant.mixed_precision = "" if bits_mode == "uniform" else bits_mode
  return config


def ptq_config(config, method: str):
  config = config.copy_and_resolve_references()
  config.ptq.method = method
  return config


def qat_config(config, steps: int, index: int = 0):
  config = sweep.with_train_seed(config, index)
  config.qat.steps = steps
  return config


def attention_round_config(config, index: int = 0, steps: int | None = None):
  """Attention Round with seed number ``index`` (its own seed and EfQAT's train seed), then
  EfQAT at rho 0.1 with QAT's optimizer settings."""
  cfg = sweep.with_train_seed(ptq_config(config, AR), index)
  cfg.ptq.attention_round.seed = config.ptq.attention_round.seed + index
  if steps is not None:
    cfg.ptq.attention_round.steps = steps
  cfg.efqat.update({k: v for k, v in config.qat.to_dict().items() if k != "method"})
  cfg.efqat.update(rho=0.1, steps=config.efqat.steps)
  return cfg


def ptq_model(config, workdir: pathlib.Path, fp):
  """The run in ``workdir`` and its PTQ model (quantized now, or restored once finished)."""
  run = pipeline.Run(config, workdir)
  return run, run_stage(run, "ptq", {"fp": fp})


# --- step times, side by side -------------------------------------------------------------------


def carrying_call(step, carry, data) -> Callable[[], None]:
  """A call of Attention Round's ``step(t, carry, data) -> carry`` carrying its state on."""
  holder = [carry]

  def call():
    holder[0] = step(0, holder[0], data)
    jax.block_until_ready(holder[0])

  return call


def attention_round_calls(run, ar) -> dict[str, Callable[[], None]]:
  """A call of Attention Round's Adam step for each block of the model ``ar`` of ``run``, on
  the calibration samples its PTQ stage reconstructs from."""
  c = run.config
  settings = c.ptq.attention_round
  samples = PTQ_METHODS.get(AR).samples(settings)
  wanted = max(c.ptq.calibration_batches, math.ceil(samples / c.batch_size))
  batches = [b["inputs"] for b in itertools.islice(run.train_batches(0), wanted)]
  qmodel = run.quantized_model(ar.formats)
  layers = quantized_layers(qmodel, ar.variables, batches[0], train=False)
  blocks = BlockReconstruction(qmodel, ar.variables, layers, batches, settings, {"train": False})
  calls = {}
  for block in blocks.blocks:
    program = blocks.program(ar.variables["params"], block)
    if program is not None:
      calls[f"{AR} {block.path}"] = carrying_call(*program)
  return calls


def train_call(run, state, efqat: bool, fp=None) -> Callable[[], None]:
  """A call of the compiled QAT step (EfQAT's with its first selection, ranked against the
  float model ``fp`` where the importance reads it) from ``state``."""
  qmodel = run.quantized_model(state.formats)
  tx, _ = make_optimizer(run.config.qat.optimizer, learning_rate=1e-4, steps=10**6)
  tx = freeze_unselected(tx) if efqat else tx
  train_state = create_train_state(state.variables, tx)
  extra = None
  if efqat:
    layers = quantized_layers(qmodel, state.variables, run.sample_inputs, train=False)
    reference = None if fp is None else fp.variables["params"]
    extra = configured_selection(run.config.efqat, state.variables, layers, reference)
    opt_state = set_trainable(train_state.opt_state, train_state.params, extra)
    train_state = train_state.replace(opt_state=opt_state)
  context = restrict_backward if efqat else None
  step = make_train_step(qmodel, tx, run.mesh, classification_loss, param_context=context)
  batch = next(run.train_batches(0))
  state = replicate(train_state, run.mesh)
  return timing.stepping_call(step, state, batch, jax.random.key(0), extra)


def step_seconds(rtn_run, rtn, ar_run, ar, fp, rounds: int) -> dict[str, float]:
  """Median seconds of QAT's step (from ``rtn``), EfQAT's (from ``ar``, ranked against ``fp``)
  and the sum over blocks of Attention Round's (one Adam step of each block), interleaved in
  this process."""
  calls = {"qat": train_call(rtn_run, rtn, False), "efqat": train_call(ar_run, ar, True, fp)}
  calls |= attention_round_calls(ar_run, ar)
  ms = {name: timing.median(t) for name, t in timing.interleaved_ms(calls, rounds).items()}
  blocks = sum(v for name, v in ms.items() if name.startswith(AR))
  return {"qat": ms["qat"] / 1e3, "efqat": ms["efqat"] / 1e3, AR: blocks / 1e3}


# --- budgets ------------------------------------------------------------------------------------


def fixed_seconds(runs: list[tuple[float, int]], step_s: float) -> float:
  """A stage's fixed cost from its ``(wall time, steps)`` runs: the median of their wall times
  less their steps at the measured step time (one run slowed by other load does not move it)."""
  return max(0.0, statistics.median(wall_s - steps * step_s for wall_s, steps in runs))


def qat_steps(budget_s: float, fixed_s: float, step_s: float) -> int:
  """QAT steps that fit in ``budget_s`` after a fixed cost of ``fixed_s`` (at least 1)."""
  return max(1, math.floor((budget_s - fixed_s) / step_s))


def budgets(step_s: dict, fixed_s: dict, steps: dict, rtn_s: float) -> dict:
  """Seconds of the Attention Round and Attention Round + EfQAT pipelines (side-by-side step
  times plus fixed costs) and the QAT steps that fit in each, after the ``rtn`` stage and QAT's
  fixed cost."""
  ar_s = fixed_s[AR] + steps[AR] * step_s[AR]
  ar_efqat_s = ar_s + fixed_s["efqat"] + steps["efqat"] * step_s["efqat"]
  qat_fixed_s = rtn_s + fixed_s["qat"]
  return {
    "budget_s": {AR: ar_s, AR_EFQAT: ar_efqat_s},
    "qat_fixed_s": qat_fixed_s,
    "qat_steps": {
      AR: qat_steps(ar_s, qat_fixed_s, step_s["qat"]),
      AR_EFQAT: qat_steps(ar_efqat_s, qat_fixed_s, step_s["qat"]),
    },
  }


def measure_budgets(
  config, here: pathlib.Path, bits_mode: str, fp, rtn, ar_runs: list[dict], quick: bool
) -> dict:
  """Step times side by side, fixed costs from probe runs of ``PROBE_STEPS`` steps (Attention
  Round and EfQAT after it; QAT from the ``rtn`` model) and, for Attention Round and EfQAT, from
  every seed's run (``ar_runs``) too, and the budgets they give."""
  probe = PROBE_STEPS[quick]
  probe_cfg = attention_round_config(config, steps=probe)
  probe_cfg.efqat.steps = probe
  probe_dir = here / f"{bits_mode}_{AR}_probe"
  ar_probe = stage_results(probe_cfg, probe_dir, fp, ("ptq", "efqat"))
  ar_run, ar = ptq_model(probe_cfg, probe_dir, fp)  # restored: same shapes as every seed's
  rtn_run, rtn_model = rtn
  qat_probe = sweep.stage_result(
    qat_config(config, probe), here / f"{bits_mode}_qat_probe", "qat", {"ptq": rtn_model}
  )
  step_s = step_seconds(rtn_run, rtn_model, ar_run, ar, fp, ROUNDS[quick])
  steps = {AR: config.ptq.attention_round.steps, "efqat": config.efqat.steps}
  stage = {AR: "ptq", "efqat": "efqat"}
  runs = {
    k: [(ar_probe[stage[k]]["wall_time_s"], probe)]
    + [(r[stage[k]]["wall_time_s"], steps[k]) for r in ar_runs]
    for k in (AR, "efqat")
  }
  runs["qat"] = [(qat_probe["wall_time_s"], probe)]
  fixed_s = {k: fixed_seconds(r, step_s[k]) for k, r in runs.items()}
  rtn_s = rtn_run.results["ptq"]["wall_time_s"]
  return {"step_s": step_s, "fixed_s": fixed_s, **budgets(step_s, fixed_s, steps, rtn_s)}


# --- one setting ----------------------------------------------------------------------------------


def cell(runs: list[dict], stages: tuple[str, ...], metric_name: str, **fields) -> dict:
  """A cell from its runs' results (one per seed): the metric of the last of ``stages``, and
  ``wall_s``, the wall time of all of them (plus ``extra_s``), median over the runs, and the
  allocator they record."""
  extra_s = fields.pop("extra_s", 0.0)
  values = [sweep.metric_of(r[stages[-1]], metric_name) for r in runs]
  walls = [extra_s + sum(r[s]["wall_time_s"] for s in stages) for r in runs]
  allocator = sweep.recorded_allocator([r[s] for r in runs for s in stages])
  wall_s = sweep.typical_seconds(walls)
  return dict(sweep.seed_stats(values), wall_s=wall_s, allocator=allocator, **fields)


def attention_round_runs(config, workdir: pathlib.Path, fp, seeds: int) -> list[dict]:
  """``results.json`` of Attention Round, then EfQAT from its model, for each seed."""
  return [
    stage_results(
      attention_round_config(config, i), sweep.seed_dir(workdir, i), fp, ("ptq", "efqat")
    )
    for i in range(seeds)
  ]


def qat_runs(config, workdir: pathlib.Path, rtn, steps: int, seeds: int) -> list[dict]:
  """``{"qat": result}`` of QAT with ``steps`` steps from the ``rtn`` model, for each seed."""
  return [
    {"qat": sweep.stage_result(qat_config(config, steps, i), sweep.seed_dir(workdir, i), "qat",
                               {"ptq": rtn})}
    for i in range(seeds)
  ]  # fmt: skip


def bits_mode_cells(config, here: pathlib.Path, bits_mode: str, fp, quick: bool, seeds: int):
  """``{method: cell}`` of one bits mode, in the table's order."""
  name = sweep.metric_name_of(config)
  ptq = {m: ptq_model(ptq_config(config, m), here / f"{bits_mode}_{m}", fp) for m in PTQ_ONCE}
  ar_runs = attention_round_runs(config, here / f"{bits_mode}_{AR}", fp, seeds)
  budget = sweep.cached_json(
    here / f"{bits_mode}_budget.json",
    lambda: measure_budgets(config, here, bits_mode, fp, ptq["rtn"], ar_runs, quick),
  )
  rtn_run, rtn = ptq["rtn"]
  cells = {m: cell([run.results] * seeds, ("ptq",), name) for m, (run, _) in ptq.items()}
  ar_steps = {AR: config.ptq.attention_round.steps, AR_EFQAT: config.efqat.steps}
  for method, stages in ((AR, ("ptq",)), (AR_EFQAT, ("ptq", "efqat"))):
    budget_s = budget["budget_s"][method]
    cells[method] = cell(ar_runs, stages, name, steps=ar_steps[method], budget_s=budget_s)
    n = budget["qat_steps"][method]
    qat = qat_runs(config, here / f"{bits_mode}_qat_{n}_steps", rtn, n, seeds)
    qat_s = budget["qat_fixed_s"] + n * budget["step_s"]["qat"]
    rtn_s = rtn_run.results["ptq"]["wall_time_s"]
    cells[f"qat@{method}"] = cell(qat, ("qat",), name, steps=n, budget_s=qat_s, extra_s=rtn_s)
  return cells


def run_setting(
  setting, root: pathlib.Path, quick: bool, seeds: int = 1, bits_modes: tuple = BITS_MODES
) -> list[dict]:
  """The rows of ``setting`` in each of ``bits_modes``, each mode's with the float model's."""
  model, weight_bits, act_bits = setting
  config = base_config(setting, root, quick)
  metric_name = sweep.metric_name_of(config)
  fp_run = pipeline.Run(config, root / model)
  fp = run_stage(fp_run, "fp", {})
  base = dict(model=model, weight_bits=weight_bits, act_bits=act_bits, metric_name=metric_name)
  base["learning_rate"] = config.qat.learning_rate  # QAT's and EfQAT's (attention_round_config)
  fp_cell = cell([fp_run.results] * seeds, ("fp",), metric_name, steps=config.fp.steps)
  rows = []
  here = root / sweep.setting_name(*setting)
  for bits_mode in bits_modes:
    cells = bits_mode_cells(with_bits_mode(config, bits_mode), here, bits_mode, fp, quick, seeds)
    cells = {"fp": fp_cell, **cells}
    mode_rows = {m: dict(base, bits_mode=bits_mode, method=m, **c) for m, c in cells.items()}
    rows += compare(mode_rows, lower_is_better=metric_name == "bits_per_char")
    print(f"{sweep.setting_name(*setting)}: {bits_mode} done", flush=True)
  return [dict({c: None for c in COLUMNS}, **r) for r in rows]


def compare(rows: dict, lower_is_better: bool) -> list[dict]:
  """The rows of a bits mode, each against its reference in ``REFERENCES`` (``versus``,
  ``verdict``)."""
  out = []
  for method, row in rows.items():
    row = dict(row, versus=None, verdict=None)
    if method in REFERENCES:
      other = REFERENCES[method]
      row = sweep.compared(row, rows[other], other, lower_is_better)
    out.append(row)
  return out


# --- tables -----------------------------------------------------------------------------------

MODEL_TITLES = {
  "resnet20_mnist5k": "ResNet-20 on mnist5k, accuracy in %",
  "mobilenetv2_mnist5k": "MobileNetV2-style model on mnist5k, accuracy in %",
  "transformer_shakespeare": "Transformer char-LM, bits per character on the validation split",
}
TABLE_METHODS = ("rtn", "optq", AR, f"qat@{AR}", AR_EFQAT, f"qat@{AR_EFQAT}")
METHOD_HEADS = (
  "seeds | FP | RTN | OPTQ | Attention Round | QAT at AR's time | AR + EfQAT | QAT at AR + EfQAT's time "
  "| QAT's and EfQAT's rate |"
)
# The separator row of a table whose first two columns precede METHOD_HEADS.
SEPARATOR = "|---" * (2 + METHOD_HEADS.count("|")) + "|"
MODEL_NAMES = {
  "resnet20_mnist5k": "ResNet-20",
  "mobilenetv2_mnist5k": "MobileNetV2",
  "transformer_shakespeare": "Transformer",
}
SUMMARY_SETTINGS = ((4, 4), (3, 4))  # README's summary: uniform bits at these W/A


def value(row: dict) -> str:
  """A cell's metric: the mean over its seeds and, where they differ, [min, max]."""
  digits = 3 if row["metric_name"] == "bits_per_char" else 1
  text = f"{row['metric']:.{digits}f}"
  low, high = row.get("metric_min", row["metric"]), row.get("metric_max", row["metric"])
  return text if low == high else f"{text} [{low:.{digits}f}, {high:.{digits}f}]"


def bold_methods(rows: dict) -> set[str]:
  """The methods of a bits mode ahead of the one they are compared with beyond both spreads,
  among Attention Round (+ EfQAT) and QAT at its time."""
  bold = set()
  for pipeline_ in (AR, AR_EFQAT):
    verdict = rows.get(f"qat@{pipeline_}", {}).get("verdict")
    bold |= {"better": {f"qat@{pipeline_}"}, "worse": {pipeline_}}.get(verdict, set())
  return bold


def method_cells(rows: dict) -> str:
  """One bits mode of one setting (``{method: row}``): its seeds, the float model's metric, every
  method's value and wall time (QAT's steps too), then the learning rate QAT and EfQAT ran with."""
  bold = bold_methods(rows)
  cells = [str(rows[AR].get("seeds") or 1), value(rows["fp"])]
  for method in TABLE_METHODS:
    if method not in rows:  # QAT at the pair's time: not run in the single-seed sweep
      cells.append("—")
      continue
    r = rows[method]
    text = f"**{value(r)}**" if method in bold else value(r)
    steps = f", {r['steps']} steps" if method.startswith("qat@") else ""
    cells.append(f"{text} ({r['wall_s']:.0f} s{steps})")
  return " | ".join([*cells, f"{rows['rtn']['learning_rate']:g}"]) + " |"


def wa(row: dict) -> str:
  """A row's weight and activation widths: "W4A8"."""
  return f"W{row['weight_bits']}A{row['act_bits']}"


def tables(rows: list[dict]) -> str:
  """Markdown of each model's table (bench/README.md shows them): per setting and bits mode,
  every method's metric, [min, max] over the seeds where they differ, and wall time; bold: the
  better of Attention Round (+ EfQAT) and QAT at its time, beyond both spreads."""
  out = []
  for model, group in sweep.grouped(rows, lambda r: r["model"]).items():
    head = [f"{MODEL_TITLES[model]}:", "", f"| W/A | bits | {METHOD_HEADS}"]
    lines = [*head, SEPARATOR]
    for mode in sweep.grouped(group, row_group).values():
      by = {r["method"]: r for r in mode}
      bits = by["rtn"]["bits_mode"].replace("_", " ")
      lines.append(f"| {wa(by['rtn'])} | {bits} | " + method_cells(by))
    out.append("\n".join(lines))
  return "\n\n".join(out)


def summary_table(rows: list[dict]) -> str:
  """README's table: uniform bits at ``SUMMARY_SETTINGS`` for each model."""
  lines = [f"| model | W/A | {METHOD_HEADS}", SEPARATOR]
  for model in MODEL_NAMES:
    for w, a in SUMMARY_SETTINGS:
      name = sweep.setting_name(model, w, a)
      by = {r["method"]: r for r in rows if row_group(r) == f"{name}/uniform"}
      lines.append(f"| {MODEL_NAMES[model]} | W{w}A{a} | " + method_cells(by))
  return "\n".join(lines)


def report(rows: list[dict], stem: str) -> None:
  """Prints the tables (bench/README.md's, then README.md's summary) and draws the plot."""
  print(tables(rows), summary_table(rows), sep="\n\n")
  plot(rows, stem)


def plot(rows: list[dict], stem: str) -> None:
  if not sweep.plotting_ready():
    return

  groups = sweep.grouped(rows, sweep.row_setting)
  fig, axes = sweep.panel_grid(len(groups), max_columns=4)  # a model's four settings to a row
  for ax, (title, group) in zip(axes, groups.items(), strict=True):
    for bits_mode, marker in zip(BITS_MODES, "osd", strict=True):
      points = [r for r in group if r["bits_mode"] == bits_mode and r["method"] != "fp"]
      ax.errorbar(
        [r["wall_s"] for r in points], [r["metric"] for r in points],
        yerr=sweep.error_bars(points), fmt=marker, capsize=2, label=bits_mode,
      )  # fmt: skip
      for r in points:
        ax.annotate(r["method"].split(" ")[0], (r["wall_s"], r["metric"]), fontsize=6)
    fps = sorted({r["metric"] for r in group if r["method"] == "fp"})
    for i, fp in enumerate(fps):
      ax.axhline(fp, color="k", ls=":", label="fp" if i == 0 else None)
    ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel(group[0]["metric_name"])
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=6)
  sweep.save_figure(fig, stem)


def row_group(row: dict) -> str:
  """A row's setting and bits mode: a run of some bits modes replaces only theirs."""
  return f"{sweep.row_setting(row)}/{row['bits_mode']}"


def bits_modes_option(parser) -> None:
  def modes(text: str) -> tuple[str, ...]:
    chosen = tuple(text.split(","))
    if not chosen or set(chosen) - set(BITS_MODES):
      raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated subset of {BITS_MODES}")
    return tuple(m for m in BITS_MODES if m in chosen)

  parser.add_argument(
    "--bits-modes", type=modes, default=BITS_MODES, help=f"subset of {','.join(BITS_MODES)}"
  )


def main():
  args = sweep.parse(
    __doc__, "attention_round", SETTING_NAMES, "ResNet-8 W4A8, short schedules", seeded=True,
    options=bits_modes_option,
  )  # fmt: skip
  bits_modes = args.options["bits_modes"]
  run = functools.partial(run_setting, seeds=args.seeds, bits_modes=bits_modes)
  groups = [f"{name}/{mode}" for name in SETTING_NAMES for mode in BITS_MODES]
  sweep.run(args, SETTINGS, SETTING_NAMES, run, COLUMNS, row_group, report, row_groups=groups)


if __name__ == "__main__":
  main()
