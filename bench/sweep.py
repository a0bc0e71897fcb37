"""The command line of a benchmark that sweeps named settings and resumes from a root folder, and
its seeds: each cell trains with several seeds from the same float and PTQ models, and two cells
differ for real only when their means are further apart than each one's spread over the seeds."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
from collections.abc import Callable
from typing import Any

import stage_runs
import timing
from reference_results import load_config

from efqat_jax import pipeline

DEFAULT_SEEDS = 3
QUICK_SEEDS = 2
SAME = "within spread"  # the verdict on two cells that do not differ for real


def setting_name(model: str, weight_bits: int, act_bits: int) -> str:
  """A setting's name, e.g. ``resnet20_mnist5k_w4a4``."""
  return f"{model}_w{weight_bits}a{act_bits}"


def setting_config(setting: tuple[str, int, int], root: pathlib.Path):
  """The config of ``configs/<model>.py`` at (model, weight bits, act bits), quiet, with its
  datasets prepared under ``root``/data."""
  model, weight_bits, act_bits = setting
  config = load_config(model)
  config.quant.update(weight_bits=weight_bits, act_bits=act_bits)
  config.progress = False
  config.data_dir = str(root / "data")
  return config


def metric_name_of(config) -> str:
  """The metric a setting is judged by: bits per character for a language model, else accuracy."""
  return "bits_per_char" if config.task == "lm" else "accuracy"


def metric_of(result: dict, name: str) -> float:
  """A stage result's metric ``name``: accuracy in percent, or bits per character."""
  return result[name] * (100.0 if name == "accuracy" else 1.0)


def row_setting(row: dict) -> str:
  """The name of the setting a result row belongs to."""
  return setting_name(row["model"], row["weight_bits"], row["act_bits"])


def setting_title(row: dict) -> str:
  """The setting a result row belongs to, as a table or plot title: ``"<model> W<w>A<a>"``."""
  return f"{row['model']} W{row['weight_bits']}A{row['act_bits']}"


@dataclasses.dataclass(frozen=True)
class SweepArgs:
  """What the command line asked for.

  Attributes:
    names: the settings to run, in the order given.
    root: where the runs live (``<root>/quick`` with --quick).
    quick: the short variant.
    plots_only: re-plot from the JSON and run nothing.
    stem: the results' file stem (``<name>`` or ``<name>_quick``).
    path: ``bench/results/<stem>.json``.
    seeds: training seeds per cell (1 for a benchmark without ``--seeds``).
    options: the values of the benchmark's own arguments (``parse(..., options=)``).
  """

  names: list[str]
  root: pathlib.Path
  quick: bool
  plots_only: bool
  stem: str
  path: pathlib.Path
  seeds: int = 1
  options: dict = dataclasses.field(default_factory=dict)


def parse(
  doc: str,
  name: str,
  setting_names: list[str],
  quick_help: str,
  seeded: bool = False,
  options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> SweepArgs:
  """Parses ``--root``, ``--settings``, ``--quick``, ``--plots-only``, if ``seeded``
  ``--seeds``, and the arguments ``options(parser)`` adds (their values: ``SweepArgs.options``);
  an unknown setting is a usage error. Without --settings: every setting (with --quick: the
  first)."""
  parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  parser.add_argument("--root", default=f"/tmp/{name}", type=pathlib.Path)
  parser.add_argument("--settings", help=f"comma-separated subset of {','.join(setting_names)}")
  parser.add_argument("--quick", action="store_true", help=quick_help)
  parser.add_argument("--plots-only", action="store_true", help="re-plot from the JSON")
  if seeded:
    parser.add_argument(
      "--seeds",
      type=int,
      help=f"training seeds per cell (default {DEFAULT_SEEDS}; {QUICK_SEEDS} with --quick)",
    )
  common = {"root", "settings", "quick", "plots_only", "seeds"}
  if options is not None:
    options(parser)
  args = parser.parse_args()
  names = args.settings.split(",") if args.settings else setting_names[: 1 if args.quick else None]
  unknown = sorted(set(names) - set(setting_names))
  if unknown:
    parser.error(f"unknown settings {unknown}; choose from {setting_names}")
  seeds = getattr(args, "seeds", None)
  seeds = (QUICK_SEEDS if args.quick else DEFAULT_SEEDS) if seeds is None else seeds
  if seeds < 1:
    parser.error(f"--seeds={seeds}: at least 1")
  timing.use_jemalloc()  # as the command line runs: the rows record the allocator
  stem = f"{name}_quick" if args.quick else name
  root = args.root / "quick" if args.quick else args.root
  path = timing.RESULTS / f"{stem}.json"
  own = {k: v for k, v in vars(args).items() if k not in common}
  seeds = seeds if seeded else 1
  return SweepArgs(names, root, args.quick, args.plots_only, stem, path, seeds, own)


def merged(
  rows: list[dict], path: pathlib.Path, setting_of: Callable[[dict], str], names: list[str]
) -> list[dict]:
  """``rows`` plus the rows of the other settings already in ``path``, in the order of
  ``names`` (rows of settings no longer in ``names`` are dropped)."""
  fresh = {setting_of(r) for r in rows}
  old = json.loads(path.read_text()) if path.exists() else []
  kept = [r for r in old if setting_of(r) not in fresh and setting_of(r) in names]
  return sorted(kept + rows, key=lambda r: names.index(setting_of(r)))


def run(
  args: SweepArgs,
  settings: list,
  setting_names: list[str],
  run_setting: Callable[[Any, pathlib.Path, bool], list[dict]],
  columns: list[str],
  setting_of: Callable[[dict], str],
  plot: Callable[[list[dict], str], None],
  row_groups: list[str] | None = None,
  **fields: Any,
) -> None:
  """Re-plots (``--plots-only``), or runs the chosen settings, prints their table, merges them
  into ``args.path`` (each row with the machine and ``fields``; a row's own ``allocator``, that of
  the runs it reports, wins over this process's) and plots everything.

  ``setting_of(row)`` names the group a row belongs to, one of ``row_groups`` (default: the
  setting names): a run replaces the rows of the groups it writes and keeps the others."""
  if args.plots_only:
    plot(json.loads(args.path.read_text()), args.stem)
    return
  machine = timing.machine()
  rows = []
  for name in args.names:
    setting = settings[setting_names.index(name)]
    rows += [{**machine, **fields, **r} for r in run_setting(setting, args.root, args.quick)]
  print(timing.markdown_table(rows, columns))
  rows = merged(rows, args.path, setting_of, row_groups or setting_names)
  print(f"wrote {timing.write_rows(args.stem, rows)}")
  plot(rows, args.stem)


# --- seeds -------------------------------------------------------------------------------------


def with_train_seed(config, index: int):
  """A copy of ``config`` whose stages after PTQ train with seed number ``index``: the config's
  own seed for index 0 (so a run made before seeds existed is index 0), ``seed + index`` else."""
  config = config.copy_and_resolve_references()
  config.train_seed = -1 if index == 0 else config.seed + index
  return config


def rho_unit(row: dict) -> str:
  """What rho counted in the CWPN and LWPN of an EfQAT result row (``efqat.rho_unit``); rows
  written before it was recorded: blocks, the default then."""
  return row.get("rho_unit") or "blocks"


def trained_shares(row: dict) -> str:
  """A row's share of kernel params trained, and of the weight-gradient work where it was
  recorded: "10.0%" or "2.5% / 10.0%"."""
  work = row.get("work_fraction")
  return f"{row['param_fraction']:.1%}" + ("" if work is None else f" / {work:.1%}")


def seed_dir(workdir: pathlib.Path, index: int) -> pathlib.Path:
  """The workdir of seed number ``index`` of a run: ``workdir`` for index 0, else
  ``<workdir>_seed<index>`` beside it."""
  return workdir if index == 0 else workdir.with_name(f"{workdir.name}_seed{index}")


def stage_result(config, workdir: pathlib.Path, stage: str, inputs: dict) -> dict:
  """``results[stage]`` of the run in ``workdir``, whose ``stage`` starts from ``inputs`` (the
  outputs of the stages it needs, made elsewhere): restored where it finished with the same
  config values (``stage_runs.checked``), else trained (resumed)."""
  run = pipeline.Run(config, workdir)
  if not stage_runs.checked(run, stage):
    pipeline.STAGES.get(stage).run(run, inputs)
  return run.results[stage]


def cached_json(path: pathlib.Path, compute: Callable[[], dict]) -> dict:
  """The JSON object in ``path``, or ``compute()`` written there first (so that what a resumed
  sweep measured once, such as a step budget, stays what its runs were started with)."""
  if not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(compute(), indent=1) + "\n")
  return json.loads(path.read_text())


def spread(values: list[float]) -> float:
  """The range of a cell's per-seed values (max - min)."""
  return max(values) - min(values)


def recorded_allocator(results: list[dict]) -> str:
  """The allocator that stage results record they ran under: one name, or the names joined where
  they differ ("not recorded" for results written before the pipeline recorded it)."""
  return " and ".join(sorted({r.get("allocator", "not recorded") for r in results}))


def typical_seconds(values: list[float]) -> float:
  """A cell's wall time over its seeds: the median, which one run slowed by other load on the
  machine does not move (a mean would)."""
  return statistics.median(values)


def seed_stats(values: list[float], name: str = "metric") -> dict:
  """A cell's per-seed ``values`` as row fields: ``name`` (their mean), ``<name>_std`` (sample
  standard deviation; 0 for one value), ``<name>_min``, ``<name>_max``, ``<name>_seeds`` (the
  values) and ``seeds`` (how many)."""
  return {
    name: statistics.fmean(values),
    f"{name}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
    f"{name}_min": min(values),
    f"{name}_max": max(values),
    f"{name}_seeds": list(values),
    "seeds": len(values),
  }


def differs(a: list[float], b: list[float]) -> bool:
  """Whether two cells' per-seed values differ for real: their means are further apart than
  the spread of each. With one value on both sides there is no spread to tell (False)."""
  if len(a) < 2 and len(b) < 2:
    return False
  gap = abs(statistics.fmean(a) - statistics.fmean(b))
  return gap > spread(a) and gap > spread(b)


def verdict(a: list[float], b: list[float], lower_is_better: bool = False) -> str:
  """Cell ``a`` against cell ``b``: ``"better"`` or ``"worse"`` where they differ for real,
  else ``SAME``."""
  if not differs(a, b):
    return SAME
  higher = statistics.fmean(a) > statistics.fmean(b)
  return "better" if higher != lower_is_better else "worse"


def compared(row: dict, other: dict, label: str, lower_is_better: bool) -> dict:
  """``row`` with ``versus = label`` (naming ``other``) and the ``verdict`` of its per-seed
  metrics against ``other``'s."""
  mark = verdict(row["metric_seeds"], other["metric_seeds"], lower_is_better)
  return dict(row, versus=label, verdict=mark)


def error_bars(rows: list[dict]) -> list[list[float]]:
  """``yerr`` for matplotlib: each row's mean to its min and to its max over the seeds (0 for
  rows written before seeds). Never negative: the mean of equal values can differ from them in
  the last bit, and matplotlib rejects a negative length."""
  below = [max(0.0, r["metric"] - r.get("metric_min", r["metric"])) for r in rows]
  above = [max(0.0, r.get("metric_max", r["metric"]) - r["metric"]) for r in rows]
  return [below, above]


# --- plots -------------------------------------------------------------------------------------


def plotting_ready() -> bool:
  """Whether matplotlib imports (then selects its file backend); if not, says how to install it."""
  try:
    import matplotlib
  except ImportError:
    print("no plots: matplotlib is missing (pip install -e '.[bench]')")
    return False
  matplotlib.use("Agg")
  return True


def grouped(rows: list[dict], key: Callable[[dict], str]) -> dict[str, list[dict]]:
  """``rows`` grouped by ``key(row)``, groups and rows in their first order."""
  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(key(r), []).append(r)
  return groups


def panel_grid(count: int, max_columns: int):
  """A figure of ``count`` panels of 5 x 4 inches, ``max_columns`` to a row; returns it and the
  ``count`` axes in reading order (spare cells of the last row hidden)."""
  import matplotlib.pyplot as plt

  columns = min(max_columns, count)
  rows = math.ceil(count / columns)
  fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
  for ax in axes.flat[count:]:
    ax.set_visible(False)
  return fig, list(axes.flat[:count])


def save_figure(fig, name: str) -> None:
  """Lays out ``fig``, writes ``bench/results/<name>.png`` and closes it."""
  import matplotlib.pyplot as plt

  fig.tight_layout()
  path = timing.RESULTS / f"{name}.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"wrote {path}")
