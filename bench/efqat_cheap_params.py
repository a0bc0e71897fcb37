"""EfQAT's cheap params (biases, norms, activation-quantizer params) trained in every layer or
only in the layers with selected weights: gap recovery at rho 10%, 3 seeds.

Per setting and seed, the float model, PTQ and QAT run once (``config.seed`` seeds init, data
order and dropout, so every seed has its own float and PTQ model); then EfQAT in each mode
(cwpl, cwpn, lwpn) at rho 10% with ``efqat.cheap_params`` = all_layers and = selected_layers,
each from a copy of that seed's workdir (same PTQ model, same step budget as QAT).

  gap_recovered = (efqat - ptq) / (qat - ptq)

per seed; the table gives the mean and the [min, max] over seeds. A difference between the two
settings counts only where their ranges do not overlap. ``train_time_s`` is the stage's wall
time before its final evaluation (compilation and re-selection included).

  python bench/efqat_cheap_params.py                       # cnn W2A2 and resnet20 W2A2
  python bench/efqat_cheap_params.py --settings=cnn_mnist5k_w2a2 --seeds=0,1

Writes bench/results/efqat_cheap_params.json. Reruns resume: every run keeps its workdir under
--root (default /tmp/efqat_cheap_params), and finished stages are read back, not run again.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import subprocess
import sys

import timing

ROOT = pathlib.Path(__file__).resolve().parent.parent
SETTINGS = {
  "cnn_mnist5k_w2a2": ("cnn_mnist5k", 2),
  "resnet20_mnist5k_w2a2": ("resnet20_mnist5k", 2),
}
MODES = ("cwpl", "cwpn", "lwpn")
CHEAP = ("all_layers", "selected_layers")
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


def _seed_rows(setting: str, seed: int, root: pathlib.Path) -> list[dict]:
  config, bits = SETTINGS[setting]
  base = root / f"{config}_w{bits}_s{seed}"
  results = _run(config, bits, base, f"--config.seed={seed}", "--config.stages=fp,ptq,qat")
  ptq, qat = results["ptq"]["accuracy"], results["qat"]["accuracy"]
  rows = []
  for mode in MODES:
    for cheap in CHEAP:
      workdir = root / f"{base.name}_{mode}_{cheap}"
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
        f"--config.efqat.cheap_params={cheap}",
      )["efqat"]
      rows.append(
        dict(
          setting=setting,
          seed=seed,
          mode=mode,
          cheap_params=cheap,
          ptq=ptq,
          qat=qat,
          efqat=efqat["accuracy"],
          gap_recovered=(efqat["accuracy"] - ptq) / (qat - ptq),
          qat_train_time_s=results["qat"].get("train_time_s"),
          train_time_s=efqat.get("train_time_s"),
          **timing.machine(),
        )
      )
  return rows


def _summary(rows: list[dict]) -> list[dict]:
  """Mean and [min, max] over seeds per setting, mode and cheap-params setting."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault((row["setting"], row["mode"], row["cheap_params"]), []).append(row)
  out = []
  for (setting, mode, cheap), group in groups.items():
    accuracy = [100 * r["efqat"] for r in group]
    recovered = [r["gap_recovered"] for r in group]
    gaps = [100 * (r["qat"] - r["ptq"]) for r in group]
    out.append(
      dict(
        setting=setting,
        mode=mode,
        cheap_params=cheap,
        seeds=len(group),
        qat_minus_ptq=f"{statistics.mean(gaps):.1f} [{min(gaps):.1f}, {max(gaps):.1f}]",
        accuracy=f"{statistics.mean(accuracy):.1f}% [{min(accuracy):.1f}, {max(accuracy):.1f}]",
        gap_recovered=(
          f"{statistics.mean(recovered):.2f} [{min(recovered):.2f}, {max(recovered):.2f}]"
        ),
      )
    )
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--settings", default=",".join(SETTINGS), help=f"of {', '.join(SETTINGS)}")
  parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
  parser.add_argument("--root", default="/tmp/efqat_cheap_params", help="where runs are kept")
  args = parser.parse_args()
  settings = args.settings.split(",")
  unknown = [s for s in settings if s not in SETTINGS]
  if unknown:
    parser.error(f"unknown settings {unknown}; allowed: {', '.join(SETTINGS)}")
  timing.use_jemalloc()
  root = pathlib.Path(args.root)
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = [row for s in settings for seed in seeds for row in _seed_rows(s, seed, root)]
  summary = _summary(rows)
  print(timing.markdown_table(summary, list(summary[0])))
  print(f"wrote {timing.write_rows('efqat_cheap_params', rows)}")


if __name__ == "__main__":
  main()
