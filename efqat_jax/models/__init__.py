"""Reference models written with plain Flax layers; quantize them with ``efqat_jax.quantize``.

Every model is called as ``model.apply(variables, inputs, train=...)``.
"""

from efqat_jax.models.cnn import SmallCNN
from efqat_jax.models.mobilenet import MobileNetV2
from efqat_jax.models.resnet import ResNet, resnet20
from efqat_jax.models.transformer import Transformer, TransformerBlock

MODELS = {"cnn": SmallCNN, "resnet": ResNet, "mobilenet": MobileNetV2, "transformer": Transformer}


def get_model(name: str, **kwargs):
  """The reference model ``name`` (a key of ``MODELS``) built with ``kwargs``."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; allowed: {sorted(MODELS)}")
  return MODELS[name](**kwargs)


__all__ = [
  "MODELS",
  "MobileNetV2",
  "ResNet",
  "SmallCNN",
  "Transformer",
  "TransformerBlock",
  "get_model",
  "resnet20",
]
