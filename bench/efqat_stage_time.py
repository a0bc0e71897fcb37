"""EfQAT end to end: does a whole stage keep the speedup of its steps, or do compilation,
re-selection, checkpoints and evaluation dilute it?

Settings: ResNet-20 on mnist5k and the Transformer LM on shakespeare_char at W4A4 (configs/;
first and last layer at 8 bits), each at its config's full step count (300 and 500). Per
setting the float model and PTQ run once (resumed from --root); then QAT and EfQAT in each mode
at rho 10% (the pipeline's defaults otherwise: re-selection every 100 steps, its default
ranking), CWPN with ``reuse_steps`` off, and CWPN and LWPN ranked by mean |w| (the
paper's importance) and by ``ptq_error``, run as pipeline stages, --repeats times each,
interleaved (qat, cwpl, cwpn, cwpn_no_reuse, lwpn, cwpn_mean_abs, lwpn_mean_abs,
cwpn_ptq_error, lwpn_ptq_error, qat, ...), every run from scratch in its own
workdir within this one process, after one short warm-up run that pays the process's first
compilations.

Per run: the stage's wall time; its step time, the median of the intervals the training loop
logs (every 10 steps; the first, which holds the compilation, is left out), so one slow
interval (a re-selection, a checkpoint, other load) does not move it; the compilation time
(tracing, lowering and XLA, from ``jax.monitoring``); the evaluation time; and the rest (data,
selections, checkpoints, logging) as wall - steps x step - compilation - evaluation; and the
share of kernel params the last selection trains. Rows give the medians over the repeats, and
for each EfQAT mode:

  step_speedup  = QAT step / EfQAT step
  stage_speedup = QAT stage wall time / EfQAT stage wall time
  kept          = stage_speedup / step_speedup (target: at least 0.9)

  python bench/efqat_stage_time.py               # both settings, 2 repeats (~20 min)
  python bench/efqat_stage_time.py --repeats=3 --settings=resnet20_mnist5k_w4a4
  python bench/efqat_stage_time.py --quick       # ResNet-20, 60 steps, 1 repeat, not written
  python bench/efqat_stage_time.py --table-only  # the table of bench/results/efqat_stage_time.json

Restarts itself under jemalloc when that is installed, as the command line does. Writes
bench/results/efqat_stage_time.json (rows of settings not run this time are kept).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import shutil
import statistics
import time

import jax
import sweep
import timing
from efqat_accuracy import efqat_config, setting_config
from stage_runs import run_stage

from efqat_jax import pipeline
from efqat_jax.pipeline.qat_efqat import PIPELINE_IMPORTANCES
from efqat_jax.train.metrics import read_scalars

SETTINGS = (("resnet20_mnist5k", 4, 4), ("transformer_shakespeare", 4, 4))
SETTING_NAMES = [sweep.setting_name(*s) for s in SETTINGS]
METHODS = (
  "qat", "cwpl", "cwpn", "cwpn_no_reuse", "lwpn", "cwpn_mean_abs", "lwpn_mean_abs",
  "cwpn_ptq_error", "lwpn_ptq_error",
)  # fmt: skip
RHO = 0.1
QUICK_STEPS = 60
WARMUP_STEPS = 20
RESULTS = timing.RESULTS / "efqat_stage_time.json"
COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)
HEADER = (
  "| model | method | ranking | ρ counts | stage (s) | step (ms) | compilation (s) | evaluation (s) | other (s) |"
  " step compilations | kernel params trained | step speedup | stage speedup | kept |"
)


_seconds: collections.Counter = collections.Counter()


def _on_event(name: str, seconds: float, **_) -> None:
  _seconds[name] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_event)


def compile_seconds() -> float:
  """Seconds this process has spent tracing, lowering and compiling so far."""
  return sum(_seconds[name] for name in COMPILE_EVENTS)


def method_config(config, method: str):
  """The config of one run: QAT as configured, or EfQAT in ``method``'s mode at RHO with QAT's
  optimizer settings and steps (``cwpn_no_reuse``: CWPN with ``reuse_steps`` off, a new
  compilation for every new set of counts; ``<mode>_<importance>``: ranked by that importance,
  e.g. mean |w|, the paper's, instead of the pipeline's default)."""
  if method == "qat":
    return config
  mode, _, variant = method.partition("_")
  cfg = efqat_config(config, mode, RHO)
  cfg.efqat.reuse_steps = variant != "no_reuse"
  if variant in PIPELINE_IMPORTANCES:
    cfg.efqat.importance = variant
  return cfg


def stage_of(method: str) -> str:
  return "qat" if method == "qat" else "efqat"


def timed_run(config, method: str, workdir: pathlib.Path, inputs: dict) -> dict:
  """Runs one stage from scratch in ``workdir`` on ``inputs`` (the ptq and fp stages' output)
  and returns where its wall time went."""
  shutil.rmtree(workdir, ignore_errors=True)
  run = pipeline.Run(method_config(config, method), workdir)
  stage = stage_of(method)
  compiled = compile_seconds()
  start = time.perf_counter()
  pipeline.STAGES.get(stage).run(run, inputs)
  wall = time.perf_counter() - start
  result = run.results[stage]
  intervals = [ms for _, ms in read_scalars(workdir / "tb" / stage)["step_time_ms"][1:]]
  step_ms = statistics.median(intervals)
  compile_s = compile_seconds() - compiled
  eval_s = result["eval_time_s"]
  steps = config.qat.steps
  return dict(
    wall_s=wall,
    step_ms=step_ms,
    compile_s=compile_s,
    eval_s=eval_s,
    other_s=wall - steps * step_ms / 1e3 - compile_s - eval_s,
    recompiles=result.get("recompiles_this_process", 1),
    param_fraction=result.get("param_fraction", 1.0),
  )


def bench_setting(setting, root: pathlib.Path, repeats: int, steps: int | None) -> list[dict]:
  """Rows of one setting: each method's medians over ``repeats`` interleaved runs."""
  config = setting_config(setting, root, quick=False)
  if steps is not None:
    config.qat.steps = steps
  here = root / sweep.setting_name(*setting)
  run = pipeline.Run(config, here)
  fp = run_stage(run, "fp", {})
  ptq = run_stage(run, "ptq", {"fp": fp})
  warmup = config.copy_and_resolve_references()
  warmup.qat.steps = WARMUP_STEPS
  inputs = {"ptq": ptq, "fp": fp}
  timed_run(warmup, "cwpl", here / "timed" / "warmup", inputs)
  runs = {method: [] for method in METHODS}
  for repeat in range(repeats):
    for method in METHODS:
      runs[method].append(timed_run(config, method, here / "timed" / f"{method}_{repeat}", inputs))
      print(f"{here.name} {method} #{repeat}: {runs[method][-1]}", flush=True)
  medians = {
    method: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for method, rs in runs.items()
  }
  qat = medians["qat"]
  rows = []
  for method, m in medians.items():
    row = dict(model=setting[0], weight_bits=setting[1], act_bits=setting[2], method=method,
               rho=None if method == "qat" else RHO, steps=config.qat.steps, repeats=repeats,
               **m, runs=runs[method])  # fmt: skip
    if method != "qat":
      step_speedup, stage_speedup = qat["step_ms"] / m["step_ms"], qat["wall_s"] / m["wall_s"]
      efqat = method_config(config, method).efqat
      row.update(step_speedup=step_speedup, stage_speedup=stage_speedup,
                 kept=stage_speedup / step_speedup, importance=efqat.importance,
                 rho_unit=efqat.rho_unit)  # fmt: skip
    rows.append(row)
  return rows


def table(rows: list[dict]) -> str:
  """The markdown table of the rows (bench/README.md quotes it)."""
  lines = [HEADER, "|---|---|---|---|" + "---|" * 10]
  for r in rows:
    efqat = r["method"] != "qat"
    ratios = (
      f"{r['step_speedup']:.2f}x | {r['stage_speedup']:.2f}x | {r['kept']:.2f}"
      if efqat
      else " |  | "
    )
    lines.append(
      f"| {r['model']} | {r['method']} | {r.get('importance') or ''} | {_rho_unit(r)} |"
      f" {r['wall_s']:.1f} | "
      f"{r['step_ms']:.1f} | "
      f"{r['compile_s']:.1f} | {r['eval_s']:.1f} | {r['other_s']:.1f} | {r['recompiles']:.0f} | "
      f"{_share(r.get('param_fraction'))} | {ratios} |"
    )
  return "\n".join(lines)


def _rho_unit(row: dict) -> str:
  """What rho counted in an EfQAT row's CWPN or LWPN (rows written before it was recorded:
  blocks); blank for QAT and CWPL, where it changes nothing."""
  if not row["method"].startswith(("cwpn", "lwpn")):
    return ""
  return sweep.rho_unit(row)


def _share(fraction) -> str:
  """A share of kernel params as a percentage; blank for rows written before it was recorded."""
  return "" if fraction is None else f"{100 * fraction:.1f}%"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", default="/tmp/efqat_stage_time", type=pathlib.Path)
  parser.add_argument("--settings", help=f"comma-separated subset of {','.join(SETTING_NAMES)}")
  parser.add_argument("--repeats", type=int, default=2, help="runs of each method (default 2)")
  parser.add_argument("--quick", action="store_true", help="ResNet-20, 60 steps, 1 repeat")
  parser.add_argument("--table-only", action="store_true", help="print the table from the JSON")
  args = parser.parse_args()
  if args.table_only:
    print(table(json.loads(RESULTS.read_text())))
    return
  names = args.settings.split(",") if args.settings else SETTING_NAMES[: 1 if args.quick else None]
  unknown = sorted(set(names) - set(SETTING_NAMES))
  if unknown:
    parser.error(f"unknown settings {unknown}; choose from {SETTING_NAMES}")
  if args.repeats < 1:
    parser.error(f"--repeats={args.repeats}: at least 1")
  timing.use_jemalloc()
  repeats, steps = (1, QUICK_STEPS) if args.quick else (args.repeats, None)
  machine = timing.machine()
  rows = []
  for name in names:
    setting = SETTINGS[SETTING_NAMES.index(name)]
    rows += [dict(r, **machine) for r in bench_setting(setting, args.root, repeats, steps)]
  print(table(rows))
  if not args.quick:
    rows = sweep.merged(rows, RESULTS, sweep.row_setting, SETTING_NAMES)
    print(f"wrote {timing.write_rows('efqat_stage_time', rows)}")


if __name__ == "__main__":
  main()
