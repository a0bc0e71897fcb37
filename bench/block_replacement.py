"""Block-replacement QAT against plain QAT at the same number of steps and at the same wall time,
and EfQAT (rho 0.1) with and without it.

Settings: ResNet-20 on mnist5k (blocks: its three stages) and the Transformer char-LM (blocks:
its two layers), configs/<model>.py, at W2A2, W3A3 and W4A4 (first and last layer at 8 bits).
Per setting the float model and the round-to-nearest PTQ model are made once; every run starts
from that PTQ model, with --seeds seeds (data order and dropout: ``config.train_seed``). Methods:
- ``qat`` / ``qat+br``: the qat stage with the task loss / with ``loss = block_replacement``
  (prefix reading, beta = gamma = tau = 1), the config's steps (budget ``steps``);
- ``qat`` at budget ``time``: as many steps as ``qat+br``'s steps take at the measured step times;
- ``efqat`` / ``efqat+br``: the efqat stage (CWPL, rho 0.1), the same steps, without / with it.
``step_ms`` is each compiled step's median time on one training batch, the four steps timed
side by side in one process (interleaved rounds after warm-up; EfQAT with its first selection),
once per setting (kept in ``<root>/<setting>/step_ms.json``, so a resumed sweep keeps its
budget). Rows of ``bench/results/block_replacement.json``: model, weight_bits, act_bits, method,
budget, steps, metric_name, metric (the mean over the seeds of the accuracy in %, or bits per
character), metric_std / _min / _max / _seeds, seeds, versus and verdict (the row against the
method named in ``versus``: better or worse by more than the spread (max - min) of either, else
within spread; ``sweep.differs``), step_ms, wall_time_s (median over the seeds).

  python bench/block_replacement.py                       # every setting (long)
  python bench/block_replacement.py --settings=resnet20_mnist5k_w2a2 --seeds=5
  python bench/block_replacement.py --quick               # ResNet-8 W2A2, 2 seeds (~4 min)
  python bench/block_replacement.py --plots-only

Runs resume: each keeps its results under --root and is skipped once finished.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import sweep
import timing
from stage_runs import run_stage

from efqat_jax import pipeline
from efqat_jax.efqat import freeze_unselected, restrict_backward, select, set_trainable
from efqat_jax.nn import quantized_layers
from efqat_jax.pipeline.qat import QAT_LOSSES
from efqat_jax.train import (
  classification_loss,
  create_train_state,
  make_optimizer,
  make_train_step,
  replicate,
)

MODELS = ("resnet20_mnist5k", "transformer_shakespeare")
SETTINGS = tuple((m, b, b) for m in MODELS for b in (2, 3, 4))
RHO = 0.1
ROUNDS = 20
COLUMNS = [
  "model", "weight_bits", "act_bits", "method", "budget", "steps", "metric_name", "metric",
  "metric_std", "metric_min", "metric_max", "seeds", "versus", "verdict", "step_ms",
]  # fmt: skip


SETTING_NAMES = [sweep.setting_name(*s) for s in SETTINGS]


def base_config(setting, root: pathlib.Path, quick: bool):
  config = sweep.setting_config(setting, root)
  config.efqat.update(rho=RHO, mode="cwpl")
  if quick:
    config.model_kwargs.depth = 8
    config.fp.steps, config.qat.steps, config.efqat.steps = 150, 30, 30
    config.block_replacement.boundaries = "BasicBlock_1,BasicBlock_2"
  return config


def variant(config, stage: str, guided: bool, steps: int | None = None):
  config = config.copy_and_resolve_references()
  config[stage].loss = "block_replacement" if guided else "task"
  if steps is not None:
    config[stage].steps = steps
  return config


def step_times(config, run, ptq, fp) -> dict[str, float]:
  """Median ms of the compiled qat / qat+br / efqat / efqat+br steps on one batch, interleaved,
  from the ``ptq`` model of ``run``."""
  qmodel = run.quantized_model(ptq.formats)
  layers = quantized_layers(qmodel, ptq.variables, run.sample_inputs, train=False)
  guided = QAT_LOSSES.get("block_replacement").make(
    run, qmodel, ptq.variables, fp, config.block_replacement
  )
  batch = next(run.train_batches(0))
  tx, _ = make_optimizer("adamw", learning_rate=1e-4, steps=10**6, warmup_steps=0)
  calls = {}
  for name, loss_fn in (("qat", classification_loss), ("qat+br", guided)):
    for efqat in (False, True):
      inner = freeze_unselected(tx) if efqat else tx
      state = create_train_state(ptq.variables, inner)
      extra = None
      if efqat:
        extra = select(state.params, layers, "cwpl", RHO)
        state = state.replace(opt_state=set_trainable(state.opt_state, state.params, extra))
      context = restrict_backward if efqat else None
      step = make_train_step(qmodel, inner, run.mesh, loss_fn, param_context=context)
      key = name.replace("qat", "efqat") if efqat else name
      calls[key] = timing.stepping_call(
        step, replicate(state, run.mesh), batch, jax.random.key(0), extra
      )
  times = timing.interleaved_ms(calls, rounds=ROUNDS)
  return {name: timing.median(ms) for name, ms in times.items()}


def run_setting(setting, root: pathlib.Path, quick: bool, seeds: int = 1) -> list[dict]:
  model, weight_bits, act_bits = setting
  config = base_config(setting, root, quick)
  metric_name = sweep.metric_name_of(config)
  fp_run = pipeline.Run(config, root / model)
  fp = run_stage(fp_run, "fp", {})
  here = root / sweep.setting_name(*setting)
  ptq_run = pipeline.Run(config, here / "ptq")
  ptq = run_stage(ptq_run, "ptq", {"fp": fp})
  guided = variant(config, "qat", True)
  ms = sweep.cached_json(here / "step_ms.json", lambda: step_times(guided, ptq_run, ptq, fp))
  steps = config.qat.steps
  time_steps = round(steps * ms["qat+br"] / ms["qat"])
  base = dict(model=model, weight_bits=weight_bits, act_bits=act_bits, metric_name=metric_name)
  rows = {}
  for method, stage, br, budget, n in (
    ("qat", "qat", False, "steps", steps),
    ("qat+br", "qat", True, "steps", steps),
    ("qat", "qat", False, "time", time_steps),
    ("efqat", "efqat", False, "steps", steps),
    ("efqat+br", "efqat", True, "steps", steps),
  ):
    cfg = variant(config, stage, br, n)
    workdir = here / (method if budget == "steps" else f"{method}_{n}_steps")
    results = [
      sweep.stage_result(
        sweep.with_train_seed(cfg, i), sweep.seed_dir(workdir, i), stage, {"ptq": ptq, "fp": fp}
      )
      for i in range(seeds)
    ]
    rows[method, budget] = dict(
      base,
      method=method,
      budget=budget,
      steps=n,
      **sweep.seed_stats([sweep.metric_of(r, metric_name) for r in results]),
      step_ms=ms[method],
      wall_time_s=sweep.typical_seconds([r["wall_time_s"] for r in results]),
      allocator=sweep.recorded_allocator(results),
    )
    print(f"{sweep.setting_name(*setting)}: {method} ({budget}) done", flush=True)
  return compare(rows, lower_is_better=metric_name == "bits_per_char")


def compare(rows: dict, lower_is_better: bool) -> list[dict]:
  """The rows, each against its reference (``versus``, ``verdict``): QAT + BR and EfQAT against
  QAT at the same steps, QAT at BR's time against QAT + BR, EfQAT + BR against EfQAT."""
  references = {
    ("qat+br", "steps"): ("qat", "steps"),
    ("qat", "time"): ("qat+br", "steps"),
    ("efqat", "steps"): ("qat", "steps"),
    ("efqat+br", "steps"): ("efqat", "steps"),
  }
  out = []
  for key, row in rows.items():
    row = dict(row, versus=None, verdict=None)
    if key in references:
      other = references[key]
      label = f"{other[0]} ({other[1]})"
      row = sweep.compared(row, rows[other], label, lower_is_better)
    out.append(row)
  return out


def plot(rows: list[dict], stem: str) -> None:
  if not sweep.plotting_ready():
    return

  groups = sweep.grouped(rows, lambda r: r["model"])
  fig, axes = sweep.panel_grid(len(groups), max_columns=len(groups))
  for ax, (title, group) in zip(axes, groups.items(), strict=True):
    labels = list(dict.fromkeys(f"{r['method']} ({r['budget']})" for r in group))
    bits = sorted({r["weight_bits"] for r in group})
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
      by_bits = {r["weight_bits"]: r for r in group if f"{r['method']} ({r['budget']})" == label}
      shown = [b for b in bits if b in by_bits]
      points = [by_bits[b] for b in shown]
      ax.bar([b + (i - len(labels) / 2) * width for b in shown], [r["metric"] for r in points],
             width, yerr=sweep.error_bars(points), capsize=2, label=label)  # fmt: skip
    ax.set_xticks(bits, [f"W{b}A{b}" for b in bits])
    ax.set_title(title)
    ax.set_ylabel(group[0]["metric_name"])
    ax.grid(alpha=0.3, axis="y")
  axes[0].legend(fontsize=6)
  sweep.save_figure(fig, stem)


def main():
  args = sweep.parse(
    __doc__, "block_replacement", SETTING_NAMES, "ResNet-8 W2A2, short", seeded=True
  )
  run = functools.partial(run_setting, seeds=args.seeds)
  sweep.run(args, SETTINGS, SETTING_NAMES, run, COLUMNS, sweep.row_setting, plot)


if __name__ == "__main__":
  main()
