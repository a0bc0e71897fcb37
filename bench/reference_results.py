"""Reference results: FP, PTQ (calibrated round-to-nearest) and QAT for the configs in configs/
at W8A8, W4A4 and W2A2 (first and last layer at 8 bits).

Each config trains its float model once; the other bit widths copy that fp stage into their
workdir and start from it (the pipeline then skips fp). A row is reproduced by
  python -m efqat_jax.main --config=configs/<config>.py --config.quant.weight_bits=B \\
    --config.quant.act_bits=B --workdir=<dir>

  python bench/reference_results.py            # all configs, all widths
  python bench/reference_results.py --quick    # CNN only, short schedules (about a minute)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

import timing

from efqat_jax import pipeline

CONFIGS = ("cnn_mnist5k", "resnet20_mnist5k", "transformer_shakespeare")
BITS = (8, 4, 2)
ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_config(name: str):
  sys.path.insert(0, str(ROOT / "configs"))
  try:
    return __import__(name).get_config()
  finally:
    sys.path.pop(0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--workdir", default="/tmp/efqat_reference")
  args = parser.parse_args()
  timing.use_jemalloc()  # as the command line runs: the rows record the allocator
  base = pathlib.Path(args.workdir)
  rows = []
  for name in CONFIGS[:1] if args.quick else CONFIGS:
    first = None
    for bits in BITS:
      config = load_config(name)
      config.progress = False
      config.stages = "fp,ptq,qat,export"  # EfQAT has its own sweep: bench/efqat_accuracy.py
      config.data_dir = str(base / "data")
      config.quant.update(weight_bits=bits, act_bits=bits)
      if args.quick:
        config.fp.steps, config.qat.steps = 100, 50
      workdir = base / name / f"w{bits}a{bits}"
      if first is not None and not (workdir / "fp").exists():
        shutil.copytree(first / "fp", workdir / "fp")
        (workdir / "stage_configs").mkdir()
        shutil.copy(first / "stage_configs" / "fp.json", workdir / "stage_configs")
        fp_result = json.loads((first / "results.json").read_text())["fp"]
        (workdir / "results.json").write_text(json.dumps({"fp": fp_result}))
      results = pipeline.run_pipeline(config, workdir)
      first = first or workdir
      metric = "bits_per_char" if config.task == "lm" else "accuracy"
      for stage in ("fp", "ptq", "qat"):
        rows.append(
          dict(
            config=name,
            weight_bits=bits,
            act_bits=bits,
            stage=stage,
            metric_name=metric,
            metric=results[stage][metric],
            wall_time_s=results[stage]["wall_time_s"],
            steps=config[stage].steps if stage != "ptq" else config.ptq.calibration_batches,
            learning_rate=config[stage].learning_rate if stage != "ptq" else None,
            quick=args.quick,
            **timing.machine(),
          )
        )
  print(
    timing.markdown_table(
      rows, ["config", "weight_bits", "stage", "metric_name", "metric", "wall_time_s"]
    )
  )
  if not args.quick:
    print(f"wrote {timing.write_rows('reference_results', rows)}")


if __name__ == "__main__":
  main()
