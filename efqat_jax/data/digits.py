"""``digits``: scikit-learn's 8x8 handwritten digits (UCI optdigits, 1,797 images, 10 classes)."""

from __future__ import annotations

import tensorflow_datasets as tfds

from efqat_jax.data.image_builder import LabeledImageBuilder


class Digits(LabeledImageBuilder):
  """Digits from ``sklearn/datasets/data/digits.csv.gz`` (what ``load_digits()`` returns).

  Splits: ``train`` 1,437 / ``test`` 360, stratified by class (largest-remainder rounding),
  seeded with 0 (see :func:`efqat_jax.data.tables.stratified_split`). Pixels are integers
  0..16 (``info.metadata["pixel_max"] == 16``). Needs scikit-learn installed (not imported).
  """

  name = "digits"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  PACKAGE = "sklearn"
  PIP_NAME = "scikit-learn"
  PARTS = ("datasets", "data", "digits.csv.gz")
  IMAGE_SHAPE = (8, 8, 1)
  PIXEL_MAX = 16
  NUM_EXAMPLES = 1797
  NUM_TEST = 360
  DESCRIPTION = "UCI optdigits 8x8 (scikit-learn's digits.csv.gz); stratified 1437/360 split."
  CITATION = "Alpaydin, Kaynak. Optical Recognition of Handwritten Digits. UCI ML Repository."
