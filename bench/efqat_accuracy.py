"""EfQAT accuracy sweep: how much of QAT's gain over PTQ EfQAT recovers when it trains only a
fraction rho of the weights (modes cwpl, cwpn, lwpn; rho 0, 0.05, 0.1, 0.25, 0.5, 1).

Settings: the CNN and ResNet-20 on mnist5k at W4A4 and W2A2, the Transformer LM on
shakespeare_char at W4A4, and a larger one (d=256, 4 layers) at W4A4 and W3A3, at rho 0.1 only
(configs/<model>.py; first and last layer at 8 bits). Per setting the float model and PTQ run
once; QAT and every EfQAT run train with --seeds seeds (data order and
dropout: ``config.train_seed``), each from that same PTQ model, EfQAT with QAT's optimizer
settings and number of steps, so EfQAT and QAT have the same step budget. At rho 0 (no kernel
channel trains) and rho 1 (every channel trains) the three modes select the same set, so those
run once per seed and share their row values.

Each row gives the mean over the seeds (``metric``), their standard deviation, min and max;
``vs_ptq`` and ``vs_qat`` say whether the row is better or worse than PTQ / QAT for real, that
is by more than the spread (max - min) of either, or within it (``sweep.differs``).

  gap_recovered = (efqat - ptq) / (qat - ptq)

on the means of the setting's metric (accuracy in %, or bits per character for the LM, where
lower is better; the ratio reads the same for both): 0 is no better than PTQ, 1 matches QAT. It
is None when QAT and PTQ differ by less than 0.5 accuracy points (0.02 bits per char): the ratio
of two small differences is then noise. wall_time_s is a stage's recorded wall time (training,
compilation and the final evaluation; PTQ: calibration and evaluation), the median over the
seeds (one run slowed by other load does not move it).

  python bench/efqat_accuracy.py                  # all settings (long: each trains fp, 3 x 15 runs)
  python bench/efqat_accuracy.py --settings=cnn_mnist5k_w4a4,cnn_mnist5k_w2a2 --seeds=5
  python bench/efqat_accuracy.py --quick   # CNN W4A4, 20 steps, rho 0.1 and 1, 2 seeds (~1.5 min)
  python bench/efqat_accuracy.py --plots-only     # re-plot and print the tables from the JSON

Writes bench/results/efqat_accuracy.json (rows of other settings already there are kept), and
efqat_accuracy_vs_rho.png and efqat_accuracy_vs_time.png; --quick writes the same names with
_quick. Reruns resume: every run keeps its checkpoints and results.json under --root (--quick
under <root>/quick), finished stages and runs are skipped, so an interrupted sweep continues
where it stopped.
"""

from __future__ import annotations

import functools
import pathlib

import sweep
from stage_runs import run_stage

from efqat_jax import fields, pipeline

SETTINGS = (
  ("cnn_mnist5k", 4, 4),
  ("cnn_mnist5k", 2, 2),
  ("resnet20_mnist5k", 4, 4),
  ("resnet20_mnist5k", 2, 2),
  ("transformer_shakespeare", 4, 4),
  ("transformer_shakespeare_large", 4, 4),
  ("transformer_shakespeare_large", 3, 3),
)
MODES = ("cwpl", "cwpn", "lwpn")
RHOS = (0.0, 0.05, 0.10, 0.25, 0.50, 1.0)
# The larger LM's runs cost several times the small one's: rho 10% (the target's) only.
MODEL_RHOS = {"transformer_shakespeare_large": (0.10,)}
QUICK_RHOS = (0.1, 1.0)
QUICK_STEPS = 20
UNIT_FREE_RUNS = "params"  # efqat.rho_unit of the runs whose selection it does not change
MIN_GAP = {"accuracy": 0.5, "bits_per_char": 0.02}  # |qat - ptq| below this: no gap_recovered
RHO_COUNTS = {
  "blocks": "channels (CWPN) and layers (LWPN)",
  "params": "weights in CWPN and LWPN",
  "work": "weight-gradient work in CWPN and LWPN",
}
COLORS = {"cwpl": "C0", "cwpn": "C1", "lwpn": "C2", "fp": "C7", "ptq": "C3", "qat": "k"}
COLUMNS = [
  "model", "weight_bits", "act_bits", "method", "mode", "rho", "steps", "metric_name", "metric",
  "metric_std", "metric_min", "metric_max", "seeds", "vs_ptq", "vs_qat", "gap_recovered",
  "param_fraction", "learning_rate", "wall_time_s",
]  # fmt: skip


SETTING_NAMES = [sweep.setting_name(*s) for s in SETTINGS]


def setting_config(setting: tuple[str, int, int], root: pathlib.Path, quick: bool):
  config = sweep.setting_config(setting, root)
  if quick:
    config.fp.steps = config.qat.steps = QUICK_STEPS
  return config


def efqat_config(config, mode: str, rho: float):
  """``config`` with EfQAT at (mode, rho) and QAT's optimizer settings and steps. CWPL's
  selection, and rho 0 and 1 in every mode, are the same whatever rho counts: those runs keep
  ``UNIT_FREE_RUNS``, the unit they were made with, so a change of the default unit reruns only
  the CWPN and LWPN runs it changes."""
  cfg = config.copy_and_resolve_references()
  cfg.efqat.update({k: v for k, v in config.qat.to_dict().items() if k != "method"})
  cfg.efqat.update(mode=mode, rho=rho)
  if mode == "cwpl" or rho in (0.0, 1.0):
    cfg.efqat.rho_unit = UNIT_FREE_RUNS
  return cfg


def seeded_results(
  cfg, workdir: pathlib.Path, stage: str, inputs: dict, seeds: range
) -> list[dict]:
  """``results[stage]`` of each seed number in ``seeds`` of the run in ``workdir``, each from
  the same ``inputs`` (the ptq and fp stages' output)."""
  return [
    sweep.stage_result(sweep.with_train_seed(cfg, i), sweep.seed_dir(workdir, i), stage, inputs)
    for i in seeds
  ]


def run_setting(setting, root: pathlib.Path, quick: bool, seeds: int = 1) -> list[dict]:
  """Trains (or resumes) fp and ptq once, and qat and every EfQAT run with ``seeds`` seeds from
  that PTQ model; returns the setting's rows."""
  config = setting_config(setting, root, quick)
  rhos = QUICK_RHOS if quick else MODEL_RHOS.get(setting[0], RHOS)
  configs = {(mode, rho): efqat_config(config, mode, rho) for mode in MODES for rho in rhos}
  for cfg in (config, *configs.values()):
    fields.validate(cfg, pipeline.pipeline_schema())
  workdir = root / sweep.setting_name(*setting)
  run = pipeline.Run(config, workdir)
  fp = run_stage(run, "fp", {})
  ptq = run_stage(run, "ptq", {"fp": fp})
  inputs = {"ptq": ptq, "fp": fp}
  run_stage(run, "qat", inputs)  # seed 0, beside fp and ptq
  qat = [
    run.results["qat"],
    *seeded_results(config, workdir / "qat", "qat", inputs, range(1, seeds)),
  ]
  efqat = {}
  for (mode, rho), cfg in configs.items():
    if rho in (0.0, 1.0) and mode != MODES[0]:  # no channel or every channel: same run
      efqat[mode, rho] = efqat[MODES[0], rho]
      continue
    efqat_dir = workdir / f"efqat_{mode}_{rho}"
    efqat[mode, rho] = seeded_results(cfg, efqat_dir, "efqat", inputs, range(seeds))
    seconds = sum(r["wall_time_s"] for r in efqat[mode, rho])
    print(f"{workdir.name}: efqat {mode} rho={rho} done ({seconds:.0f} s)", flush=True)
  return setting_rows(setting, config, run.results, qat, efqat)


def setting_rows(setting, config, results: dict, qat: list, efqat: dict) -> list[dict]:
  """One row for each of fp, ptq, qat and every EfQAT (mode, rho), each over its seeds (fp and
  ptq: the one model every seed starts from, so each seed has its value)."""
  model, weight_bits, act_bits = setting
  metric_name = sweep.metric_name_of(config)
  lower_is_better = metric_name == "bits_per_char"
  base = dict(model=model, weight_bits=weight_bits, act_bits=act_bits, metric_name=metric_name)
  base["learning_rate"] = config.qat.learning_rate  # QAT's and every EfQAT run's (efqat_config)

  def row(method, mode, rho, steps, runs):
    values = [sweep.metric_of(r, metric_name) for r in runs]
    return dict(
      base,
      method=method,
      mode=mode,
      rho=rho,
      steps=steps,
      **sweep.seed_stats(values),
      wall_time_s=sweep.typical_seconds([r["wall_time_s"] for r in runs]),
      allocator=sweep.recorded_allocator(runs),
      channel_fraction=runs[0].get("channel_fraction"),
      param_fraction=runs[0].get("param_fraction"),
      work_fraction=runs[0].get("work_fraction"),  # None where the run did not record it
      importance=runs[0].get("importance"),  # EfQAT's ranking (None: not EfQAT, or not recorded)
      rho_unit=runs[0].get("rho_unit"),
    )

  seeds = len(qat)
  ptq = row("ptq", "ptq", None, 0, [results["ptq"]] * seeds)
  qat = row("qat", "qat", 1.0, config.qat.steps, qat)
  gap = qat["metric"] - ptq["metric"]
  gap = gap if abs(gap) >= MIN_GAP[metric_name] else None

  def versus(r):
    vs_ptq = sweep.verdict(r["metric_seeds"], ptq["metric_seeds"], lower_is_better)
    vs_qat = sweep.verdict(r["metric_seeds"], qat["metric_seeds"], lower_is_better)
    recovered = None if gap is None else (r["metric"] - ptq["metric"]) / gap
    return dict(r, vs_ptq=vs_ptq, vs_qat=vs_qat, gap_recovered=recovered)

  qat_row = dict(versus(qat), vs_qat=None, gap_recovered=None)
  rows = [row("fp", "fp", None, config.fp.steps, [results["fp"]] * seeds), ptq, qat_row]
  rows += [versus(row("efqat", m, rho, config.qat.steps, runs)) for (m, rho), runs in efqat.items()]
  return [dict({c: None for c in COLUMNS}, **r) for r in rows]


# --- tables -----------------------------------------------------------------------------------


def value(r: dict) -> str:
  """A row's metric: the mean over its seeds and, where they differ, their min and max."""
  lm = r["metric_name"] == "bits_per_char"
  mean = f"{r['metric']:.3f}" if lm else f"{r['metric']:.2f}%"
  if r.get("metric_min", r["metric"]) == r.get("metric_max", r["metric"]):  # one value
    return mean
  low, high = (f"{r[k]:.3f}" if lm else f"{r[k]:.1f}" for k in ("metric_min", "metric_max"))
  return f"{mean} [{low}, {high}]"


def seed_count(r: dict) -> int:
  """How many seeds a row's metric is over (rows written before seeds: one)."""
  return r.get("seeds") or 1


def cell(r: dict) -> str:
  """An EfQAT row: its value and, in brackets, the gap recovered; ``=QAT`` / ``=PTQ`` where it
  is within QAT's / PTQ's spread (no real difference), ``<PTQ`` where it is worse than PTQ."""
  recovered = "" if r["gap_recovered"] is None else f" ({r['gap_recovered']:.2f})"
  tags = ""
  if seed_count(r) > 1:  # with one seed there is no spread to judge by
    tags += " =QAT" if r.get("vs_qat") == sweep.SAME else ""
    tags += {sweep.SAME: " =PTQ", "worse": " <PTQ"}.get(r.get("vs_ptq"), "")
  return value(r) + recovered + tags


def importance_note(rows: list[dict]) -> str:
  """ ", importance X" where the setting's EfQAT rows record their ranking, and ", rho in Y"
  (what rho counts in cwpn and lwpn: channels and layers, or weights); "" where none is."""
  efqat = [r for r in rows if r["method"] == "efqat"]
  recorded = {r.get("importance") for r in efqat} - {None}
  note = f", importance {', '.join(sorted(recorded))}" if recorded else ""
  return note + f", ρ counts {rho_counts(efqat)}"


def rate_note(qat: dict) -> str:
  """ " at learning rate X" where the QAT row records its peak learning rate (rows written
  before it was: "")."""
  rate = qat.get("learning_rate")
  return "" if rate is None else f" at learning rate {rate:g}"


def rho_counts(rows: list[dict]) -> str:
  """What rho counted in the CWPN and LWPN rows of ``rows`` at 0 < rho < 1 (at 0 and 1 they are
  CWPL's runs; rows written before the field was recorded: blocks, the default then)."""
  units = {sweep.rho_unit(r) for r in rows if r["mode"] in ("cwpn", "lwpn") and 0 < r["rho"] < 1}
  return " and ".join(RHO_COUNTS[u] for u in sorted(units))


def setting_table(title: str, rows: list[dict]) -> str:
  """One setting's heading line and its mode x rho table."""
  by = {r["method"]: r for r in rows if r["method"] != "efqat"}
  lm = rows[0]["metric_name"] == "bits_per_char"
  metric = "bits per char, lower is better" if lm else "test accuracy"
  n = seed_count(by["qat"])
  head = (
    f"**{title}** ({metric}; {n} seed{'s' if n > 1 else ''}): FP {value(by['fp'])}, PTQ "
    f"{value(by['ptq'])}, QAT {value(by['qat'])}; {by['qat']['steps']} steps"
    f"{rate_note(by['qat'])} for QAT and every EfQAT run{importance_note(rows)}."
  )
  rhos = sorted({r["rho"] for r in rows if r["method"] == "efqat"})
  lines = ["| mode | " + " | ".join(f"ρ={rho:.0%}" for rho in rhos) + " |"]
  lines.append("|---|" + "---|" * len(rhos))
  efqat = {(r["mode"], r["rho"]): r for r in rows if r["method"] == "efqat"}
  for mode in MODES:
    lines.append(f"| {mode} | " + " | ".join(cell(efqat[mode, rho]) for rho in rhos) + " |")
  shares = ", ".join(
    f"{mode} {sweep.trained_shares(efqat[mode, 0.1])}" for mode in MODES if (mode, 0.1) in efqat
  )
  return "\n".join(
    [head, "", *lines, "", f"Kernel params (/ weight-gradient work) trained at ρ=10%: {shares}."]
  )


def summary_table(groups: dict[str, list[dict]]) -> str:
  """The README's table: per setting PTQ, QAT and each mode at rho 10%."""
  lines = [
    "| setting | seeds | PTQ | QAT | " + " | ".join(f"{m.upper()} ρ=10%" for m in MODES) + " |",
    "|---|---|---|---|" + "---|" * len(MODES),
  ]
  for title, rows in groups.items():
    by = {(r["method"], r["mode"], r["rho"]): r for r in rows}
    cells = [cell(by["efqat", mode, 0.1]) for mode in MODES]
    ptq, qat = value(by["ptq", "ptq", None]), value(by["qat", "qat", 1.0])
    count = seed_count(by["qat", "qat", 1.0])
    lines.append(f"| {title} | {count} | {ptq} | {qat} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def tables(rows: list[dict]) -> str:
  """Markdown of every setting's table, then the summary at rho 10%."""
  groups = sweep.grouped(rows, sweep.setting_title)
  return "\n\n".join([*(setting_table(t, g) for t, g in groups.items()), summary_table(groups)])


# --- plots ------------------------------------------------------------------------------------


def ylabel(rows: list[dict]) -> str:
  lm = rows[0]["metric_name"] == "bits_per_char"
  return "bits per char (lower is better)" if lm else "accuracy (%)"


def draw_vs_rho(ax, rows: list[dict]) -> None:
  """Metric vs rho, a line per mode; FP, PTQ and QAT as horizontal lines."""
  for mode in MODES:
    points = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["rho"])
    if points:
      rhos, metrics = [r["rho"] for r in points], [r["metric"] for r in points]
      yerr = sweep.error_bars(points)
      ax.errorbar(rhos, metrics, yerr=yerr, fmt="o-", capsize=2, color=COLORS[mode], label=mode)
  for r in rows:
    if r["method"] != "efqat":
      style = ":" if r["method"] == "fp" else "--"
      ax.axhline(r["metric"], ls=style, color=COLORS[r["method"]], label=r["method"].upper())
  ax.set_xlim(-0.05, 1.05)  # one scale for every panel, a setting measured at one rho too
  ax.set_xlabel("rho (trained fraction)")


def draw_vs_time(ax, rows: list[dict]) -> None:
  """Metric vs stage wall time: EfQAT runs coloured by mode (labelled by rho), QAT and PTQ."""
  for mode in MODES:
    points = [r for r in rows if r["mode"] == mode]
    times, metrics = [r["wall_time_s"] for r in points], [r["metric"] for r in points]
    yerr = sweep.error_bars(points)
    ax.errorbar(times, metrics, yerr=yerr, fmt="o", capsize=2, color=COLORS[mode], label=mode)
    for r in points:
      xy = (r["wall_time_s"], r["metric"])
      ax.annotate(f"{r['rho']:g}", xy, xytext=(3, 3), textcoords="offset points", fontsize=6)
  for r in rows:
    if r["method"] in ("qat", "ptq"):
      marker = "*" if r["method"] == "qat" else "X"
      ax.scatter(
        r["wall_time_s"],
        r["metric"],
        marker=marker,
        s=120,
        color=COLORS[r["method"]],
        label=r["method"].upper(),
      )
  ax.set_xlabel("stage wall time (s)")


def plot(rows: list[dict], stem: str) -> None:
  """Writes ``bench/results/<stem>_vs_rho.png`` and ``<stem>_vs_time.png``."""
  if not sweep.plotting_ready():
    return

  groups = sweep.grouped(rows, sweep.setting_title)
  for kind, draw in (("rho", draw_vs_rho), ("time", draw_vs_time)):
    fig, axes = sweep.panel_grid(len(groups), max_columns=3)
    for ax, (title, group) in zip(axes, groups.items(), strict=True):
      draw(ax, group)
      ax.set_title(title)
      ax.set_ylabel(ylabel(group))
      ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    sweep.save_figure(fig, f"{stem}_vs_{kind}")


def report(rows: list[dict], stem: str) -> None:
  """Prints the markdown tables (bench/README.md and README.md are written from them) and
  draws the plots."""
  print(tables(rows))
  plot(rows, stem)


def main():
  args = sweep.parse(
    __doc__, "efqat_accuracy", SETTING_NAMES, "CNN W4A4, 20 steps, rho 0.1 and 1", seeded=True
  )
  run = functools.partial(run_setting, seeds=args.seeds)
  sweep.run(
    args, SETTINGS, SETTING_NAMES, run, COLUMNS, sweep.row_setting, report, quick=args.quick
  )


if __name__ == "__main__":
  main()
