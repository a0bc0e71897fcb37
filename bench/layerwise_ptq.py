"""Layer-wise PTQ on one linear layer: speed and error of RTN, OPTQ, GPFQ and AXE against the
reference implementation (Brevitas 0.13.4, torch CPU, 2 threads, measured on this project's
2-core machine type; figures quoted from the issue that asked for this bench).

The recipe is the issue's: ``rng = numpy.random.default_rng(0)``;
``mix = tril(rng.standard_normal((K, K))) / sqrt(K)``; ``X = rng.standard_normal((2048, K)) @ mix.T``;
``W = rng.standard_normal((K, K)) / sqrt(K)`` (output x input); a held-out ``X2`` drawn after ``W``
the same way. 4-bit per-channel narrow-range weights with ``scale = max|w| / 7``. Error is
``|X W^T - X Q^T|_F / |X W^T|_F`` on ``X`` and on ``X2``. AXE: P = 16, unsigned 8-bit inputs,
tiles of 128 inputs. Each method runs the library's own path, timed from the calibration rows to
the quantized weights (``H = X^T X`` and, for GPFQ, ``G = X~^T X`` included, with ``X~ = X``: the
inputs enter in float): one jitted program, compiled first, then the methods interleaved, the
median of several rounds. Peak memory is what XLA allocates for that program (arguments,
outputs and temporaries).

  python bench/layerwise_ptq.py           # K = 1024 and 4096 (a few minutes)
  python bench/layerwise_ptq.py --quick   # K = 256, under a minute
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import timing

from efqat_jax.fields import to_config
from efqat_jax.nn import QuantizedLayer
from efqat_jax.ptq import PTQ_METHODS
from efqat_jax.ptq.capture import gram
from efqat_jax.quant import QuantSpec

# (K, method) -> (seconds, error on X, held-out error): Brevitas 0.13.4, from the issue.
REFERENCE = {
  (4096, "rtn"): (0.15, 0.157, 0.157),
  (4096, "optq"): (8.9, 0.093, 0.181),
  (4096, "gpfq"): (783.0, 0.109, 0.155),
  (4096, "axe_optq"): (11.0, 0.098, 0.184),
  (4096, "axe_gpfq"): (826.0, 0.111, 0.158),
  (1024, "optq"): (0.51, None, 0.118),
  (1024, "rtn"): (None, None, 0.143),
  (1024, "gpfq"): (4.0, None, 0.124),
}
METHODS = ("rtn", "optq", "gpfq", "axe_optq", "axe_gpfq")
DAMPINGS = (0.01, 0.1, 1.0)  # OPTQ's regulariser, on the rank-deficient K = 4096 layer


def layer_data(k: int, rows: int):
  """``X, W, X2`` by the issue's recipe (float64 numpy)."""
  rng = np.random.default_rng(0)
  mix = np.tril(rng.standard_normal((k, k))) / np.sqrt(k)
  x = rng.standard_normal((rows, k)) @ mix.T
  w = rng.standard_normal((k, k)) / np.sqrt(k)
  x2 = rng.standard_normal((rows, k)) @ mix.T
  return x, w, x2


def dense_layer(k: int) -> QuantizedLayer:
  """A Dense layer's table entry: kernel ``[in, out]``, 4-bit per-channel weights, unsigned
  8-bit inputs (the AXE methods' integer range; the others ignore it)."""
  return QuantizedLayer(
    path="dense",
    weight_name="kernel",
    weight_spec=QuantSpec.for_weights(4, axis=1),
    input_spec=QuantSpec.for_activations(8),
    weight_shape=(k, k),
    out_axes=(1,),
    op=(("op", "dot_general"), ("dimension_numbers", (((1,), (0,)), ((), ())))),
  )


def quantizer(name: str, k: int, damping: float | None = None):
  """A jitted ``(x, kernel, scale) -> quantized kernel`` through the library's method."""
  method = PTQ_METHODS.get(name)
  settings = to_config(method.fields) if method.fields else None
  if "accumulator_bits" in (settings or {}):
    settings.accumulator_bits, settings.accumulator_tile = 16, 128
  if damping is not None:
    settings.damping = damping
  layer = dense_layer(k)

  def run(x, kernel, scale):
    rows = x[None]  # one group
    stats = {}
    if "h" in method.statistics:
      stats["h"] = gram(rows, rows) / x.shape[0]
    if "g" in method.statistics:
      stats["g"] = gram(rows, rows) / x.shape[0]  # X~^T X, computed as in general
    return method.quantize_weight(kernel, scale, layer, stats, settings)

  return jax.jit(run)


def relative_error(x: np.ndarray, w: np.ndarray, q: np.ndarray) -> float:
  reference = x @ w.T
  return float(np.linalg.norm(reference - x @ q.T) / np.linalg.norm(reference))


def measure(k: int, rows: int, rounds: int) -> list[dict]:
  x, w, x2 = layer_data(k, rows)
  kernel = jnp.asarray(w.T, jnp.float32)
  scale = jnp.max(jnp.abs(kernel), axis=0) / 7
  xj = jnp.asarray(x, jnp.float32)
  variants = {name: (name, None) for name in METHODS}
  if k >= 4096:
    variants |= {f"optq(damping={d:g})": ("optq", d) for d in DAMPINGS}
  programs, compile_s, outputs, memory = {}, {}, {}, {}
  for label, (name, damping) in variants.items():
    fn = quantizer(name, k, damping)
    start = time.perf_counter()
    compiled = fn.lower(xj, kernel, scale).compile()
    compile_s[label] = time.perf_counter() - start
    stats = compiled.memory_analysis()
    memory[label] = (
      stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    ) / 2**20
    programs[label] = compiled
    outputs[label] = np.asarray(compiled(xj, kernel, scale), np.float64)
  steps = {
    label: (lambda c=c: jax.block_until_ready(c(xj, kernel, scale)))
    for label, c in programs.items()
  }
  times = timing.interleaved_ms(steps, rounds=rounds, warmup=1)
  rows_out = []
  for label, (name, damping) in variants.items():
    q = outputs[label].T
    ref = REFERENCE.get((k, name)) if damping is None else None
    seconds = timing.median(times[label]) / 1e3
    settings = to_config(PTQ_METHODS.get(name).fields)
    rows_out.append(
      {
        "method": label,
        "in_features": k,
        "out_features": k,
        "calib_rows": rows,
        "seconds": seconds,
        "compile_s": compile_s[label],
        "error": relative_error(x, w, q),
        "heldout_error": relative_error(x2, w, q),
        "peak_mem_mb": memory[label],
        "damping": damping if damping is not None else settings.get("damping"),
        "reference_seconds": ref[0] if ref else None,
        "reference_error": ref[1] if ref else None,
        "reference_heldout_error": ref[2] if ref else None,
        "speedup_vs_reference": ref[0] / seconds if ref and ref[0] else None,
        **timing.machine(),
      }
    )
  return rows_out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="K = 256 only (under a minute)")
  args = parser.parse_args()
  timing.use_jemalloc()  # as the command line runs: the rows record the allocator
  sizes = [(256, 512, 2)] if args.quick else [(1024, 2048, 7), (4096, 2048, 3)]
  rows = [row for k, n, rounds in sizes for row in measure(k, n, rounds)]
  columns = [
    "method", "in_features", "calib_rows", "seconds", "reference_seconds",
    "speedup_vs_reference", "error", "heldout_error", "reference_heldout_error", "peak_mem_mb",
  ]  # fmt: skip
  print(timing.markdown_table(rows, columns))
  name = "layerwise_ptq_quick" if args.quick else "layerwise_ptq"
  print(f"wrote {timing.write_rows(name, rows)}")


if __name__ == "__main__":
  main()
