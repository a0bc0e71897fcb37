"""The benchmark scripts under bench/ as a user meets them: every one imports, the sweeps redraw
their plots from the JSON committed in bench/results, and the tables bench/README.md shows are
the ones the scripts print from that JSON. A change to a shared helper, or to the fields a row
records, cannot leave a benchmark that fails before it measures anything, or a README table
that its JSON no longer gives. The Attention Round sweep's budget arithmetic is checked on
figures worked by hand."""

import importlib
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import sweep  # noqa: E402
import timing  # noqa: E402

COMMITTED = timing.RESULTS
PLOTS = {  # script: (its report function, the figures it writes)
  "efqat_accuracy": ("report", ("efqat_accuracy_vs_rho.png", "efqat_accuracy_vs_time.png")),
  "attention_round": ("report", ("attention_round.png",)),
  "block_replacement": ("plot", ("block_replacement.png",)),
  "accumulator_tradeoff": ("plot", ("accumulator_tradeoff.png",)),
}


def committed_rows(name: str) -> list[dict]:
  return json.loads((COMMITTED / f"{name}.json").read_text())


def table_rows(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.startswith("|")]


def test_every_benchmark_script_imports():
  scripts = sorted(p.stem for p in BENCH.glob("*.py"))
  assert {"efqat_accuracy", "efqat_speedup", "attention_round", "sweep"} <= set(scripts)
  for name in scripts:
    module = importlib.import_module(name)
    assert module.__doc__, f"bench/{name}.py has no docstring"


def test_sweeps_redraw_their_plots_from_the_committed_json(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(timing, "RESULTS", tmp_path)  # the figures go here, not into bench/
  for name, (report, figures) in PLOTS.items():
    getattr(importlib.import_module(name), report)(committed_rows(name), name)
    for figure in figures:
      assert (tmp_path / figure).stat().st_size > 10_000, f"{name}: {figure} is empty"
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
    f for _, fs in PLOTS.values() for f in fs
  )
  printed = capsys.readouterr().out
  assert "| setting | seeds | PTQ | QAT |" in printed
  assert "| W/A | bits | seeds | FP | RTN | OPTQ | Attention Round |" in printed


def test_bench_readme_tables_are_the_ones_the_json_gives():
  readme = (BENCH / "README.md").read_text()
  accuracy = importlib.import_module("efqat_accuracy").tables(committed_rows("efqat_accuracy"))
  speedup = importlib.import_module("efqat_speedup")
  speed_rows = committed_rows("efqat_speedup")
  stage_time = importlib.import_module("efqat_stage_time").table(committed_rows("efqat_stage_time"))
  attention_round = importlib.import_module("attention_round").tables(
    committed_rows("attention_round")
  )
  printed = {
    "efqat_accuracy.py --plots-only": accuracy,
    "efqat_speedup.py --table-only (summary)": speedup.summary_table(speed_rows),
    "efqat_speedup.py --table-only (rows)": speedup.rows_table(speed_rows),
    "efqat_stage_time.py --table-only": stage_time,
    "attention_round.py --plots-only": attention_round,
  }
  for command, text in printed.items():
    rows = table_rows(text)
    assert len(rows) > 4, command
    missing = [row for row in rows if row not in readme]
    assert not missing, f"bench/README.md lacks {len(missing)} rows of {command}: {missing[:2]}"


def test_readme_summaries_are_the_ones_the_json_gives():
  readme = (ROOT / "README.md").read_text()
  accuracy = importlib.import_module("efqat_accuracy")
  groups = sweep.grouped(committed_rows("efqat_accuracy"), sweep.setting_title)
  attention_round = importlib.import_module("attention_round")
  printed = {
    "efqat_accuracy.py --plots-only (summary)": accuracy.summary_table(groups),
    "attention_round.py --plots-only (summary)": attention_round.summary_table(
      committed_rows("attention_round")
    ),
  }
  for command, text in printed.items():
    rows = table_rows(text)
    assert len(rows) > 4, command
    missing = [row for row in rows if row not in readme]
    assert not missing, f"README.md lacks {len(missing)} rows of {command}: {missing[:2]}"


def test_attention_round_budgets_take_the_typical_fixed_cost():
  attention_round = importlib.import_module("attention_round")
  ar, efqat = attention_round.AR, attention_round.AR_EFQAT
  # Walls of a probe (20 steps) and three seeds (200 steps) at 0.5 s a step: fixed costs 60,
  # 50, 55 and 250 (a run slowed by other load), whose median is 57.5.
  runs = [(70.0, 20), (150.0, 200), (155.0, 200), (350.0, 200)]
  assert attention_round.fixed_seconds(runs, 0.5) == 57.5
  assert attention_round.fixed_seconds([(5.0, 20)], 0.5) == 0.0  # never below zero
  step_s = {"qat": 0.25, "efqat": 0.2, ar: 0.5}
  fixed_s = {ar: 57.5, "efqat": 10.0, "qat": 7.0}
  out = attention_round.budgets(step_s, fixed_s, {ar: 200, "efqat": 100}, rtn_s=3.0)
  assert out["budget_s"] == {ar: 157.5, efqat: 187.5}
  assert out["qat_fixed_s"] == 10.0
  assert out["qat_steps"] == {ar: 590, efqat: 710}  # (157.5 - 10) / 0.25, (187.5 - 10) / 0.25
