"""Base tfds builder for labeled image tables shipped inside PyPI packages (array_record, no TF)."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from efqat_jax.data import tables
from efqat_jax.data.array_record_builder import ArrayRecordBuilder, LocalDatasetInfo
from efqat_jax.errors import DataError


class LabeledImageBuilder(ArrayRecordBuilder, skip_registration=True):
  """Reads a CSV table of ``pixels..., label`` from an installed package; fixed stratified split.

  Subclasses set the class attributes below. Examples are ``{"image": uint8 image_shape,
  "label": int}``; the largest pixel value is stored as ``info.metadata["pixel_max"]``, which
  :func:`efqat_jax.data.pipeline.batches` uses to scale images to ``[0, 1]``.
  """

  PACKAGE: str  # import name of the package holding the table
  PIP_NAME: str  # its distribution name, for the error message
  PARTS: tuple[str, ...]  # path of the table inside the package
  IMAGE_SHAPE: tuple[int, ...]
  PIXEL_MAX: int
  NUM_CLASSES: int = 10
  NUM_EXAMPLES: int  # rows of the table
  NUM_TEST: int
  SPLIT_SEED: int = 0
  DESCRIPTION: str = ""
  CITATION: str = ""

  @classmethod
  def declared_features(cls, config=None) -> tfds.features.FeaturesDict:
    del config  # no configs
    return tfds.features.FeaturesDict(
      {
        "image": tfds.features.Tensor(shape=cls.IMAGE_SHAPE, dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=cls.NUM_CLASSES),
      }
    )

  @classmethod
  def declared_split_sizes(cls, config=None) -> dict[str, int]:
    del config
    return {"train": cls.NUM_EXAMPLES - cls.NUM_TEST, "test": cls.NUM_TEST}

  def _info(self) -> tfds.core.DatasetInfo:
    return LocalDatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=self.declared_features(self.builder_config),
      supervised_keys=("image", "label"),
      metadata=tfds.core.MetadataDict(pixel_max=self.PIXEL_MAX),
      citation=self.CITATION,
    )

  def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """Locates, reads and validates the table; returns ``(images, labels)``."""
    path = tables.package_data_file(self.PACKAGE, *self.PARTS, pip_name=self.PIP_NAME)
    return tables.parse_labeled_images(
      tables.read_table(path), self.IMAGE_SHAPE, self.PIXEL_MAX, self.NUM_CLASSES
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships with a package: nothing to download
    images, labels = self.load_arrays()
    if len(labels) != self.NUM_EXAMPLES:
      raise DataError(
        f"{self.PIP_NAME}'s table has {len(labels)} rows, {self.name} expects {self.NUM_EXAMPLES}"
      )
    train, test = tables.stratified_split(labels, self.NUM_TEST, self.SPLIT_SEED)
    return {
      "train": self._generate_examples(images, labels, train),
      "test": self._generate_examples(images, labels, test),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i])}
