"""Block-replacement QAT against plain QAT at the same number of steps and at the same wall time,
and EfQAT (rho 0.1) with and without it.

Settings: ResNet-20 on mnist5k (blocks: its three stages) and the Transformer char-LM (blocks:
its two layers), configs/<model>.py, at W2A2, W3A3 and W4A4 (first and last layer at 8 bits),
every run from the same round-to-nearest PTQ model. Methods:
- ``qat`` / ``qat+br``: the qat stage with the task loss / with ``loss = block_replacement``
  (prefix reading, beta = gamma = tau = 1), the config's steps (budget ``steps``);
- ``qat`` at budget ``time``: as many steps as ``qat+br``'s steps take at the measured step times;
- ``efqat`` / ``efqat+br``: the efqat stage (CWPL, rho 0.1), the same steps, without / with it.
``step_ms`` is each compiled step's median time on one training batch, the four steps timed
side by side in one process (interleaved rounds after warm-up; EfQAT with its first selection).
Rows of ``bench/results/block_replacement.json``: model, weight_bits, act_bits, method, budget,
steps, metric_name, metric (accuracy in %, or bits per character), step_ms.

  python bench/block_replacement.py                                  # every setting (long)
  python bench/block_replacement.py --settings=resnet20_mnist5k_w2a2
  python bench/block_replacement.py --quick                          # ResNet-8 W2A2, short
  python bench/block_replacement.py --plots-only

Runs resume: each keeps its results under --root and is skipped once finished.
"""

from __future__ import annotations

import pathlib

import jax
import sweep
import timing
from reference_results import load_config
from stage_runs import metric_of, stage_results

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
  "step_ms",
]  # fmt: skip


SETTING_NAMES = [sweep.setting_name(*s) for s in SETTINGS]


def base_config(setting, root: pathlib.Path, quick: bool):
  model, weight_bits, act_bits = setting
  config = load_config(model)
  config.quant.update(weight_bits=weight_bits, act_bits=act_bits)
  config.progress = False
  config.data_dir = str(root / "data")
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


def step_times(config, workdir: pathlib.Path, fp) -> dict[str, float]:
  """Median ms of the compiled qat / qat+br / efqat / efqat+br steps on one batch, interleaved."""
  run = pipeline.Run(config, workdir)
  ptq = pipeline.STAGES.get("ptq").run(run, {"fp": fp})  # restored: it is finished
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


def run_setting(setting, root: pathlib.Path, quick: bool) -> list[dict]:
  model, weight_bits, act_bits = setting
  config = base_config(setting, root, quick)
  metric_name = "bits_per_char" if config.task == "lm" else "accuracy"
  fp_run = pipeline.Run(config, root / model)
  fp = pipeline.STAGES.get("fp").run(fp_run, {})
  here = root / sweep.setting_name(*setting)
  base = dict(model=model, weight_bits=weight_bits, act_bits=act_bits, metric_name=metric_name)
  steps = config.qat.steps
  rows = []

  def add(method, stage, guided, budget, n):
    cfg = variant(config, stage, guided, n)
    name = method if budget == "steps" else f"{method}_time"
    result = stage_results(cfg, here / name, fp, ("ptq", stage))[stage]
    rows.append(
      dict(base, method=method, budget=budget, steps=n, metric=metric_of(result, metric_name))
    )
    print(f"{sweep.setting_name(*setting)}: {method} ({budget}) done", flush=True)

  add("qat", "qat", False, "steps", steps)
  add("qat+br", "qat", True, "steps", steps)
  ms = step_times(variant(config, "qat", True), here / "qat+br", fp)
  add("qat", "qat", False, "time", round(steps * ms["qat+br"] / ms["qat"]))
  add("efqat", "efqat", False, "steps", steps)
  add("efqat+br", "efqat", True, "steps", steps)
  for row in rows:
    row["step_ms"] = ms[row["method"]]
  return rows


def plot(rows: list[dict], stem: str) -> None:
  try:
    import matplotlib
  except ImportError:
    print("no plot: matplotlib is missing (pip install -e '.[bench]')")
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(r["model"], []).append(r)
  fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
  for ax, (title, group) in zip(axes.flat, groups.items(), strict=True):
    labels = list(dict.fromkeys(f"{r['method']} ({r['budget']})" for r in group))
    bits = sorted({r["weight_bits"] for r in group})
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
      values = {
        r["weight_bits"]: r["metric"] for r in group if f"{r['method']} ({r['budget']})" == label
      }
      ax.bar([b + (i - len(labels) / 2) * width for b in bits], [values.get(b) for b in bits],
             width, label=label)  # fmt: skip
    ax.set_xticks(bits, [f"W{b}A{b}" for b in bits])
    ax.set_title(title)
    ax.set_ylabel(group[0]["metric_name"])
    ax.grid(alpha=0.3, axis="y")
  axes.flat[0].legend(fontsize=6)
  sweep.save_figure(fig, stem)


def main():
  args = sweep.parse(__doc__, "block_replacement", SETTING_NAMES, "ResNet-8 W2A2, short")
  sweep.run(args, SETTINGS, SETTING_NAMES, run_setting, COLUMNS, sweep.row_setting, plot)


if __name__ == "__main__":
  main()
