"""The weight gradient of k output channels of a convolution, per layout, against the full one.

Layouts (NHWC input, HWIO kernel, batch 64):
  vjp: the conv's own vjp on the k-channel kernel (XLA's filter-gradient convolution; what
    ``channel_subset_grad`` computed before, and still does where the rule says so);
  patch_matmul: ``g``'s shifted patches (taps x k columns) times ``x``, one matmul
    (``efqat_jax.nn.conv_weight_grad``);
  pointwise_matmul (1x1 kernels only): ``x`` at the positions the outputs read times ``g``;
  x_patches (3x3 only): im2col of ``x`` (``lax.conv_general_dilated_patches``, C x taps
    columns) times ``g``;
  x_shifts (3x3 only): a sum over the taps of ``x`` shifted to the tap times ``g``.
(For a 1x1 kernel the last two are pointwise_matmul.)

Shapes: ResNet-20's three stages (3x3, stride 1), its first downsampling conv (3x3, stride 2)
and shortcut (1x1, stride 2), and three of MobileNetV2's 1x1 convs at 28x28 input (an expand,
a projection, the last conv); k in {1, 2, 4, 8, C/4, C} of the C output channels. All steps are compiled first, then run interleaved (one call each per round, after 3 warm-up
rounds); figures are medians over rounds. ``share_*`` is the layout's time over the vjp's at
k = C (the full dW); ``rule`` is the layout ``channel_subset_grad`` uses on CPU.

  python bench/conv_weight_grad.py             # writes bench/results/conv_weight_grad.json
  python bench/conv_weight_grad.py --rounds 5  # a quick look, nothing written
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import timing
from jax import lax

from efqat_jax.nn.conv_weight_grad import LAYOUTS as MATMULS
from efqat_jax.nn.conv_weight_grad import conv_settings, cpu_layout

BATCH = 64
DN = ("NHWC", "HWIO", "NHWC")
# name: (input size, input channels, output channels, kernel size, stride)
SHAPES = {
  "resnet20 stage 1": (28, 16, 16, 3, 1),
  "resnet20 stage 2": (14, 32, 32, 3, 1),
  "resnet20 stage 3": (7, 64, 64, 3, 1),
  "resnet20 down 1->2": (28, 16, 32, 3, 2),
  "resnet20 shortcut 1->2": (28, 16, 32, 1, 2),
  "mobilenetv2 expand": (28, 16, 96, 1, 1),
  "mobilenetv2 project": (14, 144, 24, 1, 1),
  "mobilenetv2 last": (7, 64, 256, 1, 1),
}
LAYOUTS = ("vjp", "patch_matmul", "pointwise_matmul", "x_patches", "x_shifts")


def _conv(stride: int):
  return functools.partial(
    lax.conv_general_dilated, window_strides=(stride, stride), padding="SAME", dimension_numbers=DN
  )


def _vjp(op, x, g, kernel_shape):
  w = jnp.zeros(kernel_shape, x.dtype)
  return jax.vjp(lambda w_: op(x, w_), w)[1](g)[0]


def _matmul(name, op, x, g, kernel_shape):
  return MATMULS[name](x, g, kernel_shape, conv_settings(op))


def _applies(layout: str, window: int) -> bool:
  return layout in ("vjp", "patch_matmul") or (layout == "pointwise_matmul") == (window == 1)


def _x_patches(op, x, g, kernel_shape):
  kh, kw, c, k = kernel_shape
  kw_ = op.keywords
  patches = lax.conv_general_dilated_patches(
    x, (kh, kw), kw_["window_strides"], kw_["padding"], dimension_numbers=DN
  )  # features: input channel major, then the window positions
  dw = jnp.einsum("nhwp,nhwk->pk", patches, g)
  return dw.reshape(c, kh, kw, k).transpose(1, 2, 0, 3)


def _x_shifts(op, x, g, kernel_shape):
  kh, kw, _, _ = kernel_shape
  strides = op.keywords["window_strides"]
  pads = lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, op.keywords["padding"])
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  out = g.shape[1:3]

  def tap(i, j):
    limit = (x.shape[0], i + (out[0] - 1) * strides[0] + 1, j + (out[1] - 1) * strides[1] + 1)
    shifted = lax.slice(x, (0, i, j, 0), (*limit, x.shape[3]), (1, *strides, 1))
    return jnp.einsum("nhwc,nhwk->ck", shifted, g)

  return jnp.stack([jnp.stack([tap(i, j) for j in range(kw)]) for i in range(kh)])


FUNCTIONS = {
  "vjp": _vjp,
  **{name: functools.partial(_matmul, name) for name in MATMULS},
  "x_patches": _x_patches,
  "x_shifts": _x_shifts,
}


def _ks(channels: int) -> list[int]:
  return sorted({1, 2, 4, 8, channels // 4, channels})


def _steps(name: str) -> dict[tuple, object]:
  """One blocking call per (shape, k, layout)."""
  size, c_in, c_out, window, stride = SHAPES[name]
  op = _conv(stride)
  x = jax.random.normal(jax.random.key(0), (BATCH, size, size, c_in))
  out = -(-size // stride)
  steps = {}
  for k in _ks(c_out):
    kernel_shape = (window, window, c_in, k)
    g = jax.random.normal(jax.random.key(k), (BATCH, out, out, k))
    for layout in filter(lambda layout: _applies(layout, window), LAYOUTS):
      fn = jax.jit(functools.partial(FUNCTIONS[layout], op, kernel_shape=kernel_shape))
      steps[name, k, layout] = lambda fn=fn, x=x, g=g: fn(x, g).block_until_ready()
  return steps


def _rows(times: dict[tuple, list[float]], rounds: int) -> list[dict]:
  rows = []
  for name, (size, c_in, c_out, window, stride) in SHAPES.items():
    full = timing.median(times[name, c_out, "vjp"])
    op = _conv(stride)
    for k in _ks(c_out):
      ms = {
        layout: timing.median(times[name, k, layout]) if _applies(layout, window) else None
        for layout in LAYOUTS
      }
      x_shape, kernel_shape = (BATCH, size, size, c_in), (window, window, c_in, k)
      rule = cpu_layout(x_shape, kernel_shape, conv_settings(op))
      rows.append(
        dict(
          layer=name,
          shape=f"{size}x{size}x{c_in} {window}x{window}/{stride} ->{c_out}",
          k=k,
          **{f"{layout}_ms": ms[layout] for layout in LAYOUTS},
          **{f"share_{layout}": ms[layout] and ms[layout] / full for layout in LAYOUTS},
          rule=rule,
          share_rule=ms[rule] / full,
          rounds=rounds,
          **timing.machine(),
        )
      )
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=20, help="timed calls per variant")
  args = parser.parse_args()
  timing.use_jemalloc()
  steps = {key: step for name in SHAPES for key, step in _steps(name).items()}
  rows = _rows(timing.interleaved_ms(steps, args.rounds), args.rounds)
  columns = ["shape", "k", *(f"{layout}_ms" for layout in LAYOUTS)]
  columns += [*(f"share_{layout}" for layout in LAYOUTS), "rule", "share_rule"]
  print(timing.markdown_table(rows, columns))
  if args.rounds >= 20:
    print(f"wrote {timing.write_rows('conv_weight_grad', rows)}")


if __name__ == "__main__":
  main()
