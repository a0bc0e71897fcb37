"""CIFAR-style ResNet (He et al. 2016, "Deep Residual Learning", section 4.2), plain Flax layers.

Depth ``6n + 2``: a 3x3 stem conv, three stages of ``n`` basic blocks (two 3x3 convs each) with
16, 32 and 64 channels (times ``width_multiplier``), global average pooling and a Dense head.
ResNet-20/32/44/56/110 are ``n = 3/5/7/9/18``. The second and third stages start at stride 2;
where a block changes the shape, its shortcut is a 1x1 conv + BatchNorm projection (option B).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # He et al. 2015


def _batch_norm(train: bool) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


class BasicBlock(nn.Module):
  """relu(BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x)), the first conv at ``strides``."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_conv_init)
    h = conv(self.features, (3, 3), strides=self.strides)(x)
    h = nn.relu(_batch_norm(train)(h))
    h = conv(self.features, (3, 3))(h)
    h = _batch_norm(train)(h)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, (1, 1), strides=self.strides)(x)
      shortcut = _batch_norm(train)(shortcut)
    return nn.relu(h + shortcut)


class ResNet(nn.Module):
  """CIFAR-style ResNet of depth ``6n + 2`` for small images (32x32x3, 28x28x1, 8x8x1, ...).

  Attributes:
    num_classes: outputs of the classifier.
    depth: number of weight layers, ``6n + 2`` (20, 32, 44, 56, 110; 8 for a tiny model).
    width_multiplier: scales the stage widths ``stage_features``.
    stage_features: channels of the three stages before ``width_multiplier``.
  """

  num_classes: int = 10
  depth: int = 20
  width_multiplier: float = 1.0
  stage_features: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.depth < 8 or (self.depth - 2) % 6 != 0:
      raise ValueError(
        f"ResNet depth must be 6n + 2 with n >= 1 (8, 20, 32, ...), got {self.depth}"
      )
    blocks_per_stage = (self.depth - 2) // 6
    widths = [max(1, round(f * self.width_multiplier)) for f in self.stage_features]
    x = nn.Conv(widths[0], (3, 3), use_bias=False, kernel_init=_conv_init)(x)
    x = nn.relu(_batch_norm(train)(x))
    for stage, width in enumerate(widths):
      for block in range(blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(width, strides)(x, train)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


resnet8 = functools.partial(ResNet, depth=8)
resnet20 = functools.partial(ResNet, depth=20)
resnet32 = functools.partial(ResNet, depth=32)
resnet44 = functools.partial(ResNet, depth=44)
resnet56 = functools.partial(ResNet, depth=56)
