"""MobileNetV2-style network (Sandler et al. 2018) for small images, plain Flax layers.

A 3x3 stem conv, inverted residual blocks (1x1 expand conv, 3x3 depthwise conv, 1x1 linear
projection; BatchNorm after each, ReLU6 after the first two; a residual connection when the block
keeps the shape), a final 1x1 conv, global average pooling and a Dense head. The depthwise conv
is ``nn.Conv(feature_group_count=channels)``, so ``efqat_jax.quantize`` intercepts it like any conv.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

# (expansion, channels, repeats, stride) rows: a short version of the paper's Table 2 for 28x28
# inputs (28 -> 14 -> 7), small enough to train quickly on a CPU.
SMALL_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 2, 2),
  (6, 64, 1, 1),
)

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds ``value`` to a multiple of ``divisor`` (at least ``divisor``), as in the paper's code,
  never going more than 10% below ``value``."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def _batch_norm(train: bool) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


class InvertedResidual(nn.Module):
  """1x1 expand (skipped when ``expansion`` is 1), 3x3 depthwise at ``strides``, 1x1 linear
  projection; adds the input when ``strides`` is 1 and the channels are unchanged."""

  features: int
  expansion: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    in_features = x.shape[-1]
    hidden = in_features * self.expansion
    h = x
    if self.expansion != 1:
      h = nn.Conv(hidden, (1, 1), use_bias=False, kernel_init=_conv_init)(h)
      h = nn.relu6(_batch_norm(train)(h))
    h = nn.Conv(
      hidden,
      (3, 3),
      strides=self.strides,
      feature_group_count=hidden,
      use_bias=False,
      kernel_init=_conv_init,
    )(h)
    h = nn.relu6(_batch_norm(train)(h))
    h = nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=_conv_init)(h)
    h = _batch_norm(train)(h)
    if self.strides == 1 and in_features == self.features:
      h = h + x
    return h


class MobileNetV2(nn.Module):
  """MobileNetV2-style classifier for small images (28x28x1, 32x32x3, ...).

  Attributes:
    num_classes: outputs of the classifier.
    width_multiplier: scales every width (rounded to multiples of 8 by ``make_divisible``).
    expansion: if set, replaces the expansion factor of every ``blocks`` row whose factor is not
      1 (rows with factor 1 have no expand conv and keep it that way).
    blocks: ``(expansion, channels, repeats, stride)`` rows; the first block of a row has the
      stride, the others stride 1.
    stem_features: channels of the 3x3 stem conv (stride ``stem_strides``).
    stem_strides: stride of the stem conv (1 for 28x28 inputs; the paper uses 2 at 224x224).
    last_features: channels of the final 1x1 conv (not reduced below this by
      ``width_multiplier`` < 1, as in the paper).
  """

  num_classes: int = 10
  width_multiplier: float = 1.0
  expansion: int | None = None
  blocks: Sequence[tuple[int, int, int, int]] = SMALL_BLOCKS
  stem_features: int = 32
  stem_strides: int = 1
  last_features: int = 256

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    width = lambda c: make_divisible(c * self.width_multiplier)
    x = nn.Conv(
      width(self.stem_features),
      (3, 3),
      strides=self.stem_strides,
      use_bias=False,
      kernel_init=_conv_init,
    )(x)
    x = nn.relu6(_batch_norm(train)(x))
    for expansion, channels, repeats, strides in self.blocks:
      if self.expansion is not None and expansion != 1:
        expansion = self.expansion
      for i in range(repeats):
        x = InvertedResidual(width(channels), expansion, strides if i == 0 else 1)(x, train)
    last = make_divisible(self.last_features * max(1.0, self.width_multiplier))
    x = nn.Conv(last, (1, 1), use_bias=False, kernel_init=_conv_init)(x)
    x = nn.relu6(_batch_norm(train)(x))
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x)
