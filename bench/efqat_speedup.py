"""EfQAT training-step speed: QAT vs CWPL, CWPN and LWPN at several rho, W4A4 models.

One process. Per model, every variant is its own compiled step (``make_train_step``) with its
own copy of the state: the loss forward alone, QAT (every weight gradient), and EfQAT in each
mode at rho 5%, 10%, 25%, 50% (plus CWPL at 100%, everything selected but through the EfQAT
path), with biases, norms and quantizer params training in every layer (``cheap_params`` =
all_layers); each mode at rho 10% again with them training only in the selected layers
(selected_layers); and the floor of each (``ptq``: no kernel trains). All are compiled first,
then run interleaved (one step each per round, after 3 warm-up rounds), and the figures are
medians over rounds. ``backward_ms`` is step minus forward: the backward pass plus the
optimizer. Every Dense, Conv and DenseGeneral is quantized W4A4. Channels and layers are ranked
on the initialised weights by the first of ``--importance`` (default: the pipeline's
``efqat.importance``, then ``mean_abs``, the paper's); each further ranking is timed in the same
rounds at rho 10% with both cheap_params settings. ``ptq_error`` takes the initialised weights as
the float model, so it ranks by the error round-to-nearest PTQ would leave in them.

``attainable_realised`` = (QAT - mode) / (QAT - ideal) on backward times, with ideal = floor +
work_fraction x (QAT - floor) and floor the all_layers ``ptq`` row: the share of the saving a
backward pass whose weight-gradient cost followed the trained work exactly would make. Above 1
means the mode also skips work the all_layers floor keeps (selected_layers). ``work_fraction``
is the trained share of the weight-gradient multiply-adds (``TrainableSet.summary``): a conv's
weight gradient costs its weights times its output pixels, so where the trained weights sit in
early, large-output layers it exceeds ``param_fraction``, the share of the weights
(``--shares`` prints both; ``--rho-unit=work`` makes the work share rho). Rows are kept per
model and rho unit: a run replaces those it measures.

  python bench/efqat_speedup.py           # all models, writes bench/results/efqat_speedup.json
  python bench/efqat_speedup.py --quick   # resnet20 and transformer at rho 10%, nothing written
  python bench/efqat_speedup.py --models resnet20,mobilenetv2 --rounds 40 --bucket 8
  python bench/efqat_speedup.py --importance mean_abs   # the paper's ranking only
  python bench/efqat_speedup.py --table-only   # the tables of the JSON (bench/README.md)
  python bench/efqat_speedup.py --shares       # no timing: params and weight-gradient work trained

Targets: a backward speedup of at least 1.7x over QAT at rho 10% in every mode, and rho 100%
(CWPL) no slower than QAT.

It restarts itself under jemalloc when that is installed (``apt-get install libjemalloc2``);
``--allocator default`` keeps glibc's malloc and writes ``efqat_speedup_default_allocator.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
import sweep
import timing

from efqat_jax import QuantRule, QuantSpec, quantize
from efqat_jax.config import base_config
from efqat_jax.efqat import (
  CHEAP_PARAMS,
  IMPORTANCES,
  RHO_UNITS,
  freeze_unselected,
  restrict_backward,
  select,
  set_trainable,
)
from efqat_jax.models import MobileNetV2, ResNet, Transformer
from efqat_jax.nn import quantized_layers
from efqat_jax.nn.intercept import quantizable_paths
from efqat_jax.train import (
  create_train_state,
  cross_entropy,
  make_mesh,
  make_train_step,
  replicate,
  shard_batch,
)
from efqat_jax.train.step import TrainStep

MODES = ("cwpl", "cwpn", "lwpn")
RHOS = (0.05, 0.10, 0.25, 0.50)
QUICK_MODELS = ("resnet20", "transformer")
QUICK_RHOS = (0.1,)
CHEAP_PARAMS_RHO = 0.1  # the rho at which selected_layers is timed beside all_layers


def _images(key: jax.Array):
  """28x28x1 images in [0, 1) and labels of 10 classes, batch 64."""
  x_key, y_key = jax.random.split(key)
  return jax.random.uniform(x_key, (64, 28, 28, 1)), jax.random.randint(y_key, (64,), 0, 10)


def _tokens(batch: int, length: int) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  """Next-token inputs and labels, both ``(batch, length)``, over 256 tokens."""

  def make(key):
    tokens = jax.random.randint(key, (batch, length + 1), 0, 256)
    return tokens[:, :-1], tokens[:, 1:]

  return make


MODELS = {
  "resnet20": (lambda: ResNet(num_classes=10, depth=20), _images),
  "mobilenetv2": (lambda: MobileNetV2(num_classes=10), _images),
  "transformer": (
    lambda: Transformer(
      vocab_size=256, d_model=128, num_heads=4, num_layers=2, mlp_dim=512, max_len=64
    ),
    _tokens(32, 63),
  ),
  "transformer_d256": (
    lambda: Transformer(
      vocab_size=256, d_model=256, num_heads=4, num_layers=2, mlp_dim=1024, max_len=128
    ),
    _tokens(16, 128),
  ),
}


def _w4a4(model, inputs):
  """Every Dense, DenseGeneral and Conv at W4A4; token embeddings stay float (as measured)."""
  rule = QuantRule(".*", weight=QuantSpec.for_weights(4), input=QuantSpec.for_activations(4))
  kinds = quantizable_paths(model, inputs, train=False)
  embeddings = [QuantRule.keep_float(re.escape(p)) for p, kind in kinds.items() if kind == "Embed"]
  return quantize(model, [*embeddings, rule])


def _forward(qmodel):
  """The jitted training-mode loss forward pass (what every step computes before its grads)."""

  def loss(state, batch, rng):
    mutable = [c for c in state.collections if c != "quant_stats"] or False
    out = qmodel.apply(
      state.variables, batch["inputs"], train=True, mutable=mutable, rngs={"dropout": rng}
    )
    logits = out[0] if mutable else out
    return cross_entropy(logits, batch["labels"])

  return jax.jit(loss)


def _compiled(name: str, jitted, *args):
  """``jitted`` compiled for ``args``, with the compile time printed. For a train step, a call
  ``(state, batch, rng, extra)`` of the executable (which also takes the step's loss)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  print(f"  {name}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
  if not isinstance(jitted, TrainStep):
    return compiled
  return lambda state, batch, rng, extra: compiled(state, batch, rng, extra, jitted.loss_fn)


def _variants(rhos, importances: list[str]) -> list[tuple[str, float, str, str]]:
  """(mode, rho, cheap_params, importance) of every timed step: QAT, each mode at each rho, CWPL
  at rho 1 (everything selected, through the EfQAT path) and PTQ (no kernel trains: the floor of
  the backward pass while biases, normalisation and activation-quantizer params train), all with
  cheap params in every layer; then each mode at ``CHEAP_PARAMS_RHO`` and PTQ with cheap params
  in the selected layers only. All ranked by ``importances[0]``; then each mode at
  ``CHEAP_PARAMS_RHO`` with both cheap_params settings ranked by each further importance."""
  first = importances[0]
  return [
    ("qat", 1.0, "all_layers", first),
    *((mode, rho, "all_layers", first) for mode in MODES for rho in rhos),
    ("cwpl", 1.0, "all_layers", first),
    ("ptq", 0.0, "all_layers", first),
    *((mode, CHEAP_PARAMS_RHO, "selected_layers", first) for mode in MODES),
    ("ptq", 0.0, "selected_layers", first),
    *(
      (mode, CHEAP_PARAMS_RHO, cheap, importance)
      for importance in importances[1:]
      for cheap in CHEAP_PARAMS
      for mode in MODES
    ),
  ]


def _built(name: str):
  """Model ``name`` at W4A4, initialised: (qmodel, variables, its quantized layers, (inputs,
  labels))."""
  build, data = MODELS[name]
  inputs, labels = data(jax.random.key(1))
  qmodel = _w4a4(build(), inputs)
  variables = qmodel.init(jax.random.key(0), inputs, train=False)
  layers = quantized_layers(qmodel, variables, inputs, train=False)
  return qmodel, variables, layers, (inputs, labels)


def shares_table(models, importance: str) -> str:
  """Per model and mode at rho 10%, in each rho unit: the kernel params trained and the share of
  the weight-gradient work (``TrainableSet.summary``'s ``work_fraction``); no timing."""
  lines = [
    "| model | ρ counts | mode | kernel params trained | weight-gradient work |",
    "|---|---|---|---|---|",
  ]
  for name in models:
    _, variables, layers, _ = _built(name)
    for unit in RHO_UNITS:
      for mode in MODES:
        trainable = select(
          variables["params"],
          layers,
          mode,
          CHEAP_PARAMS_RHO,
          importance=importance,
          rho_unit=unit,
          batch_stats=variables.get("batch_stats", {}),
          reference=variables["params"],
        )
        share = trainable.summary()
        lines.append(
          f"| {name} | {unit} | {mode} | {share['param_fraction']:.1%}"
          f" | {share['work_fraction']:.1%} |"
        )
  return "\n".join(lines)


def _efqat_state(base, layers, variant, bucket: int, rho_unit: str, mesh):
  """A copy of ``base`` with the selection of ``variant`` (mode, rho, cheap_params, importance)
  installed, rho counting ``rho_unit``, and that selection."""
  mode, rho, cheap, importance = variant
  state = jax.tree.map(jnp.copy, base)
  trainable = select(
    state.params,
    layers,
    mode,
    rho,
    bucket=bucket,
    cheap_params=cheap,
    importance=importance,
    rho_unit=rho_unit,
    batch_stats=state.collections.get("batch_stats", {}),
    reference=state.params,  # ptq_error: as round-to-nearest PTQ of these weights leaves them
  )
  trainable = replicate(trainable, mesh)
  opt_state = set_trainable(state.opt_state, state.params, trainable)
  return replicate(state.replace(opt_state=opt_state), mesh), trainable


def _bench_model(
  name: str, rhos, rounds: int, bucket: int, importances: list[str], rho_unit: str
) -> list[dict]:
  """Compiles every variant of model ``name``, times them interleaved, returns its rows."""
  print(f"{name}:", flush=True)
  qmodel, variables, layers, (inputs, labels) = _built(name)
  mesh = make_mesh()
  tx = freeze_unselected(optax.adamw(1e-4))
  base = replicate(create_train_state(variables, tx), mesh)
  batch = shard_batch({"inputs": inputs, "labels": labels}, mesh)
  rng = replicate(jax.random.key(2), mesh)
  jitted = make_train_step(qmodel, tx, mesh, param_context=restrict_backward)

  forward = _compiled("forward", _forward(qmodel), base, batch, rng)
  runs = {"forward": lambda: forward(base, batch, rng).block_until_ready()}
  fractions = {}
  for variant in _variants(rhos, importances):
    if variant[0] == "qat":
      state, args = jax.tree.map(jnp.copy, base), (batch, rng, None)
      trainable = select(base.params, layers, "qat")
    else:
      state, trainable = _efqat_state(base, layers, variant, bucket, rho_unit, mesh)
      args = (batch, rng, trainable)
    step = _compiled(" ".join(map(str, variant)), jitted, state, *args)
    runs[variant] = timing.stepping_call(step, state, *args)
    fractions[variant] = trainable.summary()

  times = {k: timing.median(v) for k, v in timing.interleaved_ms(runs, rounds).items()}
  forward_ms = times["forward"]
  qat_bw = times["qat", 1.0, "all_layers", importances[0]] - forward_ms
  floor_bw = times["ptq", 0.0, "all_layers", importances[0]] - forward_ms
  rows = []
  for variant in _variants(rhos, importances):
    mode, rho, cheap, importance = variant
    backward_ms, share = times[variant] - forward_ms, fractions[variant]["work_fraction"]
    ideal_bw = floor_bw + share * (qat_bw - floor_bw)
    rows.append(
      dict(
        model=name,
        mode=mode,
        rho=rho,
        cheap_params=cheap,
        step_ms=times[variant],
        forward_ms=forward_ms,
        backward_ms=backward_ms,
        step_speedup=(qat_bw + forward_ms) / times[variant],
        backward_speedup=qat_bw / backward_ms,
        attainable_realised=(qat_bw - backward_ms) / (qat_bw - ideal_bw) if share < 1 else None,
        channel_fraction=fractions[variant]["channel_fraction"],
        param_fraction=fractions[variant]["param_fraction"],
        work_fraction=share,
        importance=importance,
        rho_unit=rho_unit,
        rounds=rounds,
        **timing.machine(),
      )
    )
  return rows


def _with_other_models(rows: list[dict], stem: str) -> list[dict]:
  """``rows`` after the rows of the models and rho units they do not cover, from the JSON
  already written."""
  path = timing.RESULTS / f"{stem}.json"
  measured = {(row["model"], row["rho_unit"]) for row in rows}
  kept = (
    [r for r in json.loads(path.read_text()) if (r["model"], sweep.rho_unit(r)) not in measured]
    if path.exists()
    else []
  )
  return kept + rows


def _cell(row: dict) -> str:
  """``backward speedup (step speedup, attainable share)``, bold from the 1.7x target."""
  text = f"{row['backward_speedup']:.2f}x"
  text = f"**{text}**" if row["backward_speedup"] >= 1.7 else text
  share = row["attainable_realised"]
  return f"{text} ({row['step_speedup']:.2f}x{'' if share is None else f', {share:.0%}'})"


def _floor(row: dict) -> str:
  """The floor's backward speedup; where its backward time is within a few ms of 0 (no kernel
  and nothing below the lowest trained layer trains), the ratio is noise: "~0 ms"."""
  if row["backward_ms"] < 5:
    return f"~0 ms ({row['backward_ms']:.1f})"
  return f"{row['backward_speedup']:.2f}x"


def _find(rows: list[dict], mode: str, rho: float, cheap: str, importance=None) -> dict:
  """The row of (mode, rho, cheap_params), of ``importance`` where given."""
  return next(
    r
    for r in rows
    if (r["mode"], r["rho"], r["cheap_params"]) == (mode, rho, cheap)
    and importance in (None, r["importance"])
  )


def summary_table(rows: list[dict]) -> str:
  """One line per model, cheap_params and ranking at ``CHEAP_PARAMS_RHO``: the backward speedup
  of each mode, (its step speedup, the attainable saving realised), its kernel params trained;
  the floor (``ptq``) and rho 100% beside (bench/README.md quotes it)."""
  lines = [
    "| model | cheap params | ranking | ρ counts | QAT step / backward (ms) | CWPL ρ=10% |"
    " CWPN ρ=10% | LWPN ρ=10% | floor | ρ=100% step vs QAT |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for model, unit in dict.fromkeys((r["model"], sweep.rho_unit(r)) for r in rows):
    own = [r for r in rows if (r["model"], sweep.rho_unit(r)) == (model, unit)]
    qat, full = _find(own, "qat", 1.0, "all_layers"), _find(own, "cwpl", 1.0, "all_layers")
    timed = dict.fromkeys((r["cheap_params"], r["importance"]) for r in own if r["mode"] != "qat")
    for cheap, importance in sorted(timed, key=lambda k: (k[1] != qat["importance"], k)):
      modes = [_find(own, m, CHEAP_PARAMS_RHO, cheap, importance) for m in MODES]
      cells = [f"{_cell(r)}, {sweep.trained_shares(r)}" for r in modes]
      floor = _find(own, "ptq", 0.0, cheap)
      lines.append(
        f"| {model} | {cheap} | {importance} | {unit} |"
        f" {qat['step_ms']:.1f} / {qat['backward_ms']:.1f} | "
        + " | ".join(cells)
        + f" | {_floor(floor)} ({floor['step_speedup']:.2f}x) |"
        f" {full['step_speedup']:.3f}x |"
      )
  return "\n".join(lines)


def rows_table(rows: list[dict]) -> str:
  """Every row (bench/README.md's table of all rows)."""
  lines = [
    "| model | ranking | ρ counts | mode | ρ | cheap params | step ms | backward ms | step speedup |"
    " backward speedup | attainable saving realised | channels trained | kernel params / work"
    " trained |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    share = "" if r["attainable_realised"] is None else f"{r['attainable_realised']:.0%}"
    lines.append(
      f"| {r['model']} | {r['importance']} | {sweep.rho_unit(r)} | {r['mode']} | {r['rho']:.2f} |"
      f" {r['cheap_params']} |"
      f" {r['step_ms']:.1f} | {r['backward_ms']:.1f} | {r['step_speedup']:.2f} |"
      f" {r['backward_speedup']:.2f} | {share} | {r['channel_fraction']:.1%} |"
      f" {sweep.trained_shares(r)} |"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="two models, rho 10%%, 5 rounds")
  parser.add_argument("--rounds", type=int, default=None, help="timed steps per variant (>= 20)")
  parser.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)}")
  parser.add_argument("--bucket", type=int, default=1, help="cwpn per-layer count rounding")
  parser.add_argument("--allocator", choices=["jemalloc", "default"], default="jemalloc")
  parser.add_argument("--table-only", action="store_true", help="the tables of the JSON")
  parser.add_argument(
    "--shares",
    action="store_true",
    help="no timing: per model and mode at rho 10%%, the kernel params and the weight-gradient"
    " work each rho unit trains (first --importance)",
  )
  default_importances = dict.fromkeys([base_config().efqat.importance, "mean_abs"])
  parser.add_argument(
    "--importance",
    default=",".join(default_importances),
    help=f"comma list of rankings, of {', '.join(IMPORTANCES)}: the first at every rho, the"
    " others at rho 10%% (default: the pipeline's, then the paper's)",
  )
  parser.add_argument(
    "--rho-unit",
    default=base_config().efqat.rho_unit,
    choices=RHO_UNITS,
    help="what rho counts in cwpn and lwpn (default: the pipeline's)",
  )
  args = parser.parse_args()
  if args.table_only:
    stem = "efqat_speedup" + ("" if args.allocator == "jemalloc" else "_default_allocator")
    rows = json.loads((timing.RESULTS / f"{stem}.json").read_text())
    print(f"{summary_table(rows)}\n\n{rows_table(rows)}")
    return
  models = args.models.split(",") if args.models else QUICK_MODELS if args.quick else MODELS
  unknown = [m for m in models if m not in MODELS]
  if unknown:
    parser.error(f"unknown models {unknown}; allowed: {', '.join(MODELS)}")
  importances = args.importance.split(",")
  unknown = [i for i in importances if i not in IMPORTANCES]
  if unknown or len(set(importances)) < len(importances):
    parser.error(f"--importance: {args.importance!r}; allowed: distinct {', '.join(IMPORTANCES)}")
  if args.shares:
    print(shares_table(models, importances[0]))
    return
  rounds = args.rounds or (5 if args.quick else 30)
  if not args.quick and rounds < 20:
    parser.error("--rounds must be at least 20 (medians of fewer are too noisy)")
  if args.allocator == "jemalloc":
    timing.use_jemalloc()
  rhos = QUICK_RHOS if args.quick else RHOS
  rows = [
    row
    for name in models
    for row in _bench_model(name, rhos, rounds, args.bucket, importances, args.rho_unit)
  ]
  print(f"{rows_table(rows)}\n\n{summary_table(rows)}")
  if not args.quick:
    stem = "efqat_speedup" + ("" if timing.allocator() == "jemalloc" else "_default_allocator")
    print(f"wrote {timing.write_rows(stem, _with_other_models(rows, stem))}")


if __name__ == "__main__":
  main()
