"""Attention Round against round-to-nearest, OPTQ and QAT at the same wall time, with uniform and
mixed-precision weights, and EfQAT from the Attention Round model.

Settings: ResNet-20 and the MobileNetV2-style model on mnist5k, the Transformer char-LM
(configs/<model>.py: first and last layer at 8 bits), at W4 and W3 with A8 and A4. Each bits mode
is a set of per-layer weight widths: ``uniform`` (every other layer at W), ``coding_length``
(Attention Round's mixed precision) and ``sensitivity`` (the baseline: the loss increase of each
layer rounded alone), both mixed ones within the weight memory of ``uniform``. Per bits mode:
- ``rtn``, ``optq``, ``attention_round``: the PTQ stage; ``wall_s`` is its wall time;
- ``qat``: QAT from the ``rtn`` model with as many steps as fit in Attention Round's wall time
  (QAT's compiled step timed on its own, its fixed cost from a probe run of 20 steps);
- ``attention_round+efqat``: EfQAT (rho 0.1, QAT's steps and optimizer) from Attention Round.
Rows of ``bench/results/attention_round.json``: model, weight_bits, act_bits, bits_mode, method,
metric_name, metric (accuracy in %, or bits per character), wall_s.

  python bench/attention_round.py                                  # every setting (long)
  python bench/attention_round.py --settings=resnet20_mnist5k_w3a4
  python bench/attention_round.py --quick                          # ResNet-8 W4A8, short
  python bench/attention_round.py --plots-only

Runs resume: each keeps its results under --root and is skipped once finished.
"""

from __future__ import annotations

import math
import pathlib

import jax
import sweep
import timing
from reference_results import load_config
from stage_runs import metric_of, stage_results

from efqat_jax import pipeline
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
PTQ_METHODS = ("rtn", "optq", "attention_round")
PROBE_STEPS = 20
ROUNDS = 20
COLUMNS = [
  "model", "weight_bits", "act_bits", "bits_mode", "method", "metric_name", "metric", "wall_s",
]  # fmt: skip


SETTING_NAMES = [sweep.setting_name(*s) for s in SETTINGS]


def base_config(setting, root: pathlib.Path, quick: bool):
  model, weight_bits, act_bits = setting
  config = load_config(model)
  config.quant.update(weight_bits=weight_bits, act_bits=act_bits)
  config.progress = False
  config.data_dir = str(root / "data")
  if quick:
    config.model_kwargs.depth = 8
    config.fp.steps, config.qat.steps, config.efqat.steps = 150, 30, 30
    config.ptq.attention_round.steps = 20
  return config


def with_bits_mode(config, bits_mode: str):
  config = config.copy_and_resolve_references()
  config.quant.mixed_precision = "" if bits_mode == "uniform" else bits_mode
  return config


def qat_step_seconds(config, workdir: pathlib.Path, fp) -> float:
  """Median seconds of QAT's compiled train step on one training batch (interleaved rounds after
  warm-up), for the finished PTQ stage of ``workdir``."""
  run = pipeline.Run(config, workdir)
  ptq = pipeline.STAGES.get("ptq").run(run, {"fp": fp})  # restored: it is finished
  qmodel = run.quantized_model(ptq.formats)
  tx, _ = make_optimizer(config.qat.optimizer, learning_rate=1e-4, steps=10**6)
  step = make_train_step(qmodel, tx, run.mesh, classification_loss)
  state = replicate(create_train_state(ptq.variables, tx), run.mesh)
  call = timing.stepping_call(step, state, next(run.train_batches(0)), jax.random.key(0), None)
  return timing.median(timing.interleaved_ms({"qat": call}, rounds=ROUNDS)["qat"]) / 1e3


def qat_steps_within(config, seconds: float, workdir: pathlib.Path, fp) -> int:
  """QAT steps whose stage (compilation and evaluation included) takes ``seconds``: the compiled
  step's time, and the fixed cost from a probe run of ``PROBE_STEPS`` steps (its wall time less
  those steps). The stage's own per-step work (data, logging) is not in the step's time, so QAT
  may run somewhat over; the table gives each wall time as measured."""
  probe = config.copy_and_resolve_references()
  probe.qat.steps = PROBE_STEPS
  probe_dir = workdir / f"{PROBE_STEPS}_steps"
  wall = stage_results(probe, probe_dir, fp, ("ptq", "qat"))["qat"]["wall_time_s"]
  per_step = qat_step_seconds(probe, probe_dir, fp)
  fixed = max(0.0, wall - PROBE_STEPS * per_step)
  return max(1, math.floor((seconds - fixed) / per_step))


def run_setting(setting, root: pathlib.Path, quick: bool) -> list[dict]:
  model, weight_bits, act_bits = setting
  config = base_config(setting, root, quick)
  metric_name = "bits_per_char" if config.task == "lm" else "accuracy"
  fp_run = pipeline.Run(config, root / model)
  fp = pipeline.STAGES.get("fp").run(fp_run, {})
  base = dict(model=model, weight_bits=weight_bits, act_bits=act_bits, metric_name=metric_name)
  fp_result = fp_run.results["fp"]
  rows = [
    dict(base, bits_mode="uniform", method="fp", metric=metric_of(fp_result, metric_name),
         wall_s=fp_result["wall_time_s"])
  ]  # fmt: skip
  here = root / sweep.setting_name(*setting)
  for bits_mode in BITS_MODES:
    mode_config = with_bits_mode(config, bits_mode)
    ptq = {}
    for method in PTQ_METHODS:
      cfg = mode_config.copy_and_resolve_references()
      cfg.ptq.method = method
      ptq[method] = stage_results(cfg, here / f"{bits_mode}_{method}", fp, ("ptq",))["ptq"]
      rows.append(
        dict(base, bits_mode=bits_mode, method=method, metric=metric_of(ptq[method], metric_name),
             wall_s=ptq[method]["wall_time_s"])
      )  # fmt: skip
    budget = ptq["attention_round"]["wall_time_s"]
    cfg = mode_config.copy_and_resolve_references()
    cfg.qat.steps = qat_steps_within(cfg, budget, here / f"{bits_mode}_qat_probe", fp)
    qat = stage_results(cfg, here / f"{bits_mode}_qat", fp, ("ptq", "qat"))["qat"]
    rows.append(
      dict(base, bits_mode=bits_mode, method=f"qat ({cfg.qat.steps} steps)",
           metric=metric_of(qat, metric_name), wall_s=qat["wall_time_s"])
    )  # fmt: skip
    cfg = mode_config.copy_and_resolve_references()
    cfg.ptq.method = "attention_round"
    cfg.efqat.update({k: v for k, v in config.qat.to_dict().items() if k != "method"})
    cfg.efqat.update(rho=0.1, steps=config.efqat.steps)
    efqat = stage_results(cfg, here / f"{bits_mode}_attention_round", fp, ("ptq", "efqat"))
    rows.append(
      dict(base, bits_mode=bits_mode, method="attention_round+efqat",
           metric=metric_of(efqat["efqat"], metric_name), wall_s=efqat["efqat"]["wall_time_s"])
    )  # fmt: skip
    print(f"{sweep.setting_name(*setting)}: {bits_mode} done", flush=True)
  return rows


def plot(rows: list[dict], stem: str) -> None:
  try:
    import matplotlib
  except ImportError:
    print("no plot: matplotlib is missing (pip install -e '.[bench]')")
    return
  matplotlib.use("Agg")

  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(sweep.row_setting(r), []).append(r)
  fig, axes = sweep.panel_grid(len(groups), max_columns=4)  # a model's four settings to a row
  for ax, (title, group) in zip(axes, groups.items(), strict=True):
    for bits_mode, marker in zip(BITS_MODES, "osd", strict=True):
      points = [r for r in group if r["bits_mode"] == bits_mode and r["method"] != "fp"]
      ax.scatter(
        [r["wall_s"] for r in points], [r["metric"] for r in points], marker=marker,
        label=bits_mode,
      )  # fmt: skip
      for r in points:
        ax.annotate(r["method"].split(" ")[0], (r["wall_s"], r["metric"]), fontsize=6)
    fp = next(r for r in group if r["method"] == "fp")
    ax.axhline(fp["metric"], color="k", ls=":", label="fp")
    ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel(group[0]["metric_name"])
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=6)
  sweep.save_figure(fig, stem)


def main():
  args = sweep.parse(__doc__, "attention_round", SETTING_NAMES, "ResNet-8 W4A8, short schedules")
  sweep.run(args, SETTINGS, SETTING_NAMES, run_setting, COLUMNS, sweep.row_setting, plot)


if __name__ == "__main__":
  main()
