"""EfQAT training-step speed: QAT vs CWPL, CWPN and LWPN at several rho, W4A4 models.

One process. Per model, every variant is its own compiled step (``make_train_step``) with its
own copy of the state: the loss forward alone, QAT (every weight gradient), and EfQAT in each
mode at rho 5%, 10%, 25%, 50% (plus CWPL at 100%, everything selected but through the EfQAT
path). All are compiled first, then run interleaved (one step each per round, after 3 warm-up
rounds), and the figures are medians over rounds. ``backward_ms`` is step minus forward: the
backward pass plus the optimizer. Every Dense, Conv and DenseGeneral is quantized W4A4.

  python bench/efqat_speedup.py           # all models, writes bench/results/efqat_speedup.json
  python bench/efqat_speedup.py --quick   # resnet20 and transformer at rho 10%, nothing written
  python bench/efqat_speedup.py --models resnet20,mobilenetv2 --rounds 40 --bucket 8

Targets: a backward speedup of at least 1.7x over QAT at rho 10% in every mode, and rho 100%
(CWPL) no slower than QAT.

It restarts itself under jemalloc when that is installed (``apt-get install libjemalloc2``).
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
import timing

from efqat_jax import QuantRule, QuantSpec, quantize
from efqat_jax.efqat import freeze_unselected, restrict_backward, select, set_trainable
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

MODES = ("cwpl", "cwpn", "lwpn")
RHOS = (0.05, 0.10, 0.25, 0.50)
QUICK_MODELS = ("resnet20", "transformer")
QUICK_RHOS = (0.1,)
COLUMNS = [
  "model",
  "mode",
  "rho",
  "step_ms",
  "backward_ms",
  "step_speedup",
  "backward_speedup",
  "channel_fraction",
]


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
  """``jitted`` compiled for ``args``, with the compile time printed."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  print(f"  {name}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
  return compiled


def _variants(rhos) -> list[tuple[str, float]]:
  """(mode, rho) of every timed step: QAT, each mode at each rho, CWPL at rho 1 (everything
  selected, through the EfQAT path) and PTQ (no kernel trains: the floor of the backward pass
  while biases, normalisation and activation-quantizer params train)."""
  return [
    ("qat", 1.0),
    *((mode, rho) for mode in MODES for rho in rhos),
    ("cwpl", 1.0),
    ("ptq", 0.0),
  ]


def _efqat_state(base, layers, mode: str, rho: float, bucket: int, mesh):
  """A copy of ``base`` with the selection of ``mode`` at ``rho`` installed, and that selection."""
  state = jax.tree.map(jnp.copy, base)
  trainable = replicate(select(state.params, layers, mode, rho, bucket=bucket), mesh)
  opt_state = set_trainable(state.opt_state, state.params, trainable)
  return replicate(state.replace(opt_state=opt_state), mesh), trainable


def _bench_model(name: str, rhos, rounds: int, bucket: int) -> list[dict]:
  """Compiles every variant of model ``name``, times them interleaved, returns its rows."""
  print(f"{name}:", flush=True)
  build, data = MODELS[name]
  inputs, labels = data(jax.random.key(1))
  qmodel = _w4a4(build(), inputs)
  mesh = make_mesh()
  tx = freeze_unselected(optax.adamw(1e-4))
  variables = qmodel.init(jax.random.key(0), inputs, train=False)
  layers = quantized_layers(qmodel, variables, inputs, train=False)
  base = replicate(create_train_state(variables, tx), mesh)
  batch = shard_batch({"inputs": inputs, "labels": labels}, mesh)
  rng = replicate(jax.random.key(2), mesh)
  jitted = make_train_step(qmodel, tx, mesh, param_context=restrict_backward)

  forward = _compiled("forward", _forward(qmodel), base, batch, rng)
  runs = {"forward": lambda: forward(base, batch, rng).block_until_ready()}
  fractions = {}
  for mode, rho in _variants(rhos):
    if mode == "qat":
      state, args = jax.tree.map(jnp.copy, base), (batch, rng)
      trainable = select(base.params, layers, "qat")
    else:
      state, trainable = _efqat_state(base, layers, mode, rho, bucket, mesh)
      args = (batch, rng, trainable)
    step = _compiled(f"{mode} {rho:.2f}", jitted, state, *args)
    runs[mode, rho] = timing.stepping_call(step, state, *args)
    fractions[mode, rho] = trainable.summary()

  times = {k: timing.median(v) for k, v in timing.interleaved_ms(runs, rounds).items()}
  forward_ms, qat_ms = times["forward"], times["qat", 1.0]
  rows = []
  for mode, rho in _variants(rhos):
    step_ms = times[mode, rho]
    rows.append(
      dict(
        model=name,
        mode=mode,
        rho=rho,
        step_ms=step_ms,
        forward_ms=forward_ms,
        backward_ms=step_ms - forward_ms,
        step_speedup=qat_ms / step_ms,
        backward_speedup=(qat_ms - forward_ms) / (step_ms - forward_ms),
        channel_fraction=fractions[mode, rho]["channel_fraction"],
        param_fraction=fractions[mode, rho]["param_fraction"],
        rounds=rounds,
        **timing.machine(),
      )
    )
  return rows


def _conv_weight_gradient_rows(rounds: int) -> list[dict]:
  """The weight-gradient convolution of k output channels alone, at ResNet-20's three stage
  shapes (3x3, stride 1, batch 64): what one partially trained layer costs for its dW."""
  dn = ("NHWC", "HWIO", "NHWC")
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
  runs, shapes = {}, {}
  for size, channels in ((28, 16), (14, 32), (7, 64)):
    x = jax.random.normal(jax.random.key(0), (64, size, size, channels))
    for k in sorted({1, 2, 4, 8, channels}):
      w = jax.random.normal(jax.random.key(1), (3, 3, channels, k))
      g = jax.random.normal(jax.random.key(2), (64, size, size, k))
      dw = jax.jit(lambda x, w, g: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0])
      runs[size, channels, k] = lambda dw=dw, x=x, w=w, g=g: dw(x, w, g).block_until_ready()
      shapes[size, channels, k] = k / channels
  times = timing.interleaved_ms(runs, rounds)
  rows = []
  for (size, channels, k), t in times.items():
    full = timing.median(times[size, channels, channels])
    rows.append(
      dict(
        layer=f"{size}x{size}x{channels}",
        k=k,
        dw_ms=timing.median(t),
        share_of_channels=shapes[size, channels, k],
        share_of_full_dw_time=timing.median(t) / full,
      )
    )
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="two models, rho 10%%, 5 rounds")
  parser.add_argument("--rounds", type=int, default=None, help="timed steps per variant (>= 20)")
  parser.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)}")
  parser.add_argument("--bucket", type=int, default=1, help="cwpn per-layer count rounding")
  args = parser.parse_args()
  models = args.models.split(",") if args.models else QUICK_MODELS if args.quick else MODELS
  unknown = [m for m in models if m not in MODELS]
  if unknown:
    parser.error(f"unknown models {unknown}; allowed: {', '.join(MODELS)}")
  rounds = args.rounds or (5 if args.quick else 30)
  if not args.quick and rounds < 20:
    parser.error("--rounds must be at least 20 (medians of fewer are too noisy)")
  timing.use_jemalloc()
  rhos = QUICK_RHOS if args.quick else RHOS
  rows = [row for name in models for row in _bench_model(name, rhos, rounds, args.bucket)]
  print(timing.markdown_table(rows, COLUMNS))
  dw_rows = _conv_weight_gradient_rows(rounds)
  print(timing.markdown_table(dw_rows, list(dw_rows[0])))
  if not args.quick:
    print(f"wrote {timing.write_rows('efqat_speedup', rows)}")
    print(f"wrote {timing.write_rows('efqat_speedup_conv_dw', dw_rows)}")


if __name__ == "__main__":
  main()
