"""The command line of a benchmark that sweeps named settings and resumes from a root folder."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
from collections.abc import Callable
from typing import Any

import timing


def setting_name(model: str, weight_bits: int, act_bits: int) -> str:
  """A setting's name, e.g. ``resnet20_mnist5k_w4a4``."""
  return f"{model}_w{weight_bits}a{act_bits}"


def row_setting(row: dict) -> str:
  """The name of the setting a result row belongs to."""
  return setting_name(row["model"], row["weight_bits"], row["act_bits"])


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
  """

  names: list[str]
  root: pathlib.Path
  quick: bool
  plots_only: bool
  stem: str
  path: pathlib.Path


def parse(doc: str, name: str, setting_names: list[str], quick_help: str) -> SweepArgs:
  """Parses ``--root``, ``--settings``, ``--quick`` and ``--plots-only``; an unknown setting is
  a usage error. Without --settings: every setting (with --quick: the first)."""
  parser = argparse.ArgumentParser(description=doc.split("\n")[0])
  parser.add_argument("--root", default=f"/tmp/{name}", type=pathlib.Path)
  parser.add_argument("--settings", help=f"comma-separated subset of {','.join(setting_names)}")
  parser.add_argument("--quick", action="store_true", help=quick_help)
  parser.add_argument("--plots-only", action="store_true", help="re-plot from the JSON")
  args = parser.parse_args()
  names = args.settings.split(",") if args.settings else setting_names[: 1 if args.quick else None]
  unknown = sorted(set(names) - set(setting_names))
  if unknown:
    parser.error(f"unknown settings {unknown}; choose from {setting_names}")
  stem = f"{name}_quick" if args.quick else name
  root = args.root / "quick" if args.quick else args.root
  return SweepArgs(names, root, args.quick, args.plots_only, stem, timing.RESULTS / f"{stem}.json")


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
  **fields: Any,
) -> None:
  """Re-plots (``--plots-only``), or runs the chosen settings, prints their table, merges them
  into ``args.path`` (each row with the machine and ``fields``) and plots everything."""
  if args.plots_only:
    plot(json.loads(args.path.read_text()), args.stem)
    return
  machine = timing.machine()
  rows = []
  for name in args.names:
    setting = settings[setting_names.index(name)]
    rows += [dict(r, **fields, **machine) for r in run_setting(setting, args.root, args.quick)]
  print(timing.markdown_table(rows, columns))
  rows = merged(rows, args.path, setting_of, setting_names)
  print(f"wrote {timing.write_rows(args.stem, rows)}")
  plot(rows, args.stem)


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
