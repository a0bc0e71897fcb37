"""Reference models written with plain Flax layers; quantize them with ``efqat_jax.quantize``."""

from efqat_jax.models.cnn import SmallCNN
from efqat_jax.models.transformer import Transformer, TransformerBlock

__all__ = ["SmallCNN", "Transformer", "TransformerBlock"]
