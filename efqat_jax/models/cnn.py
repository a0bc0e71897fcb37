"""A small CNN for 28x28 (or 8x8) images, written with plain Flax layers."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax


class SmallCNN(nn.Module):
  """Conv-ReLU stages (the first at stride 1, the rest at stride 2), then a classifier.

  Attributes:
    num_classes: outputs of the classifier.
    features: channels of each conv stage.
    hidden: width of a hidden Dense layer on the flattened feature map; None for global
      average pooling straight into the classifier.
  """

  num_classes: int = 10
  features: Sequence[int] = (16, 32, 64)
  hidden: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout or batch norm; kept for a uniform model signature
    for i, width in enumerate(self.features):
      x = nn.relu(nn.Conv(width, (3, 3), strides=1 if i == 0 else 2)(x))
    if self.hidden is None:
      x = x.mean(axis=(1, 2))
    else:
      x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)
