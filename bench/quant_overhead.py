"""Cost of fake quantization in a jitted training step: float vs W8A8 and W4A4.

One process; the float and quantized steps of a model run interleaved (one step each per round)
after warm-up, and the median step times give the ratio quantized / float. Every Dense, Conv
and DenseGeneral is quantized (weights per channel with LSQ scales, inputs per tensor with LSQ
scale and zero point), and the step is loss + grad w.r.t. all params (quantization params
included) + Adam, with params and optimizer state donated.

  python bench/quant_overhead.py           # full size
  python bench/quant_overhead.py --quick   # under a minute

It restarts itself under jemalloc when that is installed (``apt-get install libjemalloc2``);
``--allocator default`` keeps glibc's malloc and writes ``quant_overhead_default_allocator.json``.
"""

from __future__ import annotations

import argparse

import jax
import optax
import timing

from efqat_jax.models import SmallCNN, Transformer
from efqat_jax.nn import QuantRule, quantize
from efqat_jax.quant import QuantSpec

BITS = [(8, 8), (4, 4)]


def _rules(w: int, a: int, fixed_first_input: str | None) -> list[QuantRule]:
  """Every layer at WwAa with LSQ scales; optionally the model input's quantizer not learnable.

  A learnable input scale on the first layer needs the gradient w.r.t. the model's input,
  which a float step never computes (for the CNN, one extra convolution).
  """
  weight, act = QuantSpec.for_weights(w), QuantSpec.for_activations(a)
  rules = [QuantRule(".*", weight=weight, input=act)]
  if fixed_first_input:
    fixed = QuantSpec.for_activations(a, learnable=False)
    rules.insert(0, QuantRule(fixed_first_input, weight=weight, input=fixed))
  return rules


def _cnn(quick: bool):
  model = SmallCNN(num_classes=10, features=(16, 32) if quick else (32, 64, 128))
  x = jax.random.uniform(jax.random.key(1), (32 if quick else 64, 28, 28, 1))
  labels = jax.random.randint(jax.random.key(2), (x.shape[0],), 0, 10)

  def loss(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return model, x, loss


def _transformer(quick: bool):
  model = Transformer(
    vocab_size=128,
    d_model=64 if quick else 128,
    num_heads=4,
    num_layers=2,
    mlp_dim=256 if quick else 512,
    max_len=128,
  )
  tokens = jax.random.randint(jax.random.key(1), (8 if quick else 16, 65 if quick else 129), 0, 128)
  x, targets = tokens[:, :-1], tokens[:, 1:]

  def loss(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  return model, x, loss


def _train_step(model, x, loss):
  """A jitted, donated step and a closure that runs it once, blocking."""
  params = model.init(jax.random.key(0), x)["params"]
  tx = optax.adam(1e-3)

  def step(params, opt_state):
    value, grads = jax.value_and_grad(lambda p: loss(model.apply({"params": p}, x)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  state = [params, tx.init(params)]
  step = jax.jit(step, donate_argnums=(0, 1))

  def run():
    state[0], state[1], value = step(*state)
    value.block_until_ready()

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small models, few rounds")
  parser.add_argument("--rounds", type=int, default=None, help="timed steps per variant")
  parser.add_argument("--allocator", choices=["jemalloc", "default"], default="jemalloc")
  args = parser.parse_args()
  if args.allocator == "jemalloc":
    timing.use_jemalloc()
  rounds = args.rounds or (10 if args.quick else 80)
  rows = []
  cases = (
    ("cnn", _cnn, None),
    ("cnn, first input scale fixed", _cnn, "Conv_0"),
    ("transformer", _transformer, None),
  )
  for name, build, fixed_first_input in cases:
    model, x, loss = build(args.quick)
    steps = {"float": _train_step(model, x, loss)}
    for w, a in BITS:
      qmodel = quantize(model, _rules(w, a, fixed_first_input))
      steps[f"w{w}a{a}"] = _train_step(qmodel, x, loss)
    times = timing.interleaved_ms(steps, rounds)
    float_ms = timing.median(times["float"])
    for w, a in BITS:
      quant_ms = timing.median(times[f"w{w}a{a}"])
      rows.append(
        dict(
          model=name,
          weight_bits=w,
          act_bits=a,
          float_ms=float_ms,
          quant_ms=quant_ms,
          ratio=quant_ms / float_ms,
          rounds=rounds,
          quick=args.quick,
          **timing.machine(),
        )
      )
  print(
    timing.markdown_table(
      rows, ["model", "weight_bits", "act_bits", "float_ms", "quant_ms", "ratio"]
    )
  )
  if not args.quick:
    suffix = "" if timing.allocator() == "jemalloc" else "_default_allocator"
    print(f"wrote {timing.write_rows('quant_overhead' + suffix, rows)}")


if __name__ == "__main__":
  main()
