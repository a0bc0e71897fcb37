"""Base class of this package's tfds builders: array_record files, read without TensorFlow."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils
from tensorflow_datasets.core.utils import tqdm_utils


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
  """Hides tfds' progress bars inside the block, then restores the previous setting."""
  was_active = getattr(tqdm_utils, "_active", True)  # tfds has no public getter
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(was_active)


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """The ``DatasetInfo`` of a dataset built from local files, which tfds' GCS bucket never holds.

  tfds looks a dataset up in its bucket whenever a builder is made before preparation, and each
  lookup leaves an empty directory in the system's temporary folder; this skips the lookup.
  """

  def initialize_from_bucket(self) -> None:
    """Nothing to fetch: the dataset is described by its builder."""


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A ``GeneratorBasedBuilder`` that writes ``array_record`` (random access, no TF needed).

  Read the result with ``builder.as_data_source()`` or ``tfds.data_source(name, data_dir=...)``.
  Preparation prints nothing (tfds' banner and progress bars go to absl's info log).
  Subclasses declare their split sizes and features, so they are known before preparation
  (:func:`efqat_jax.data.describe`); a test checks them against the prepared data.
  """

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """The builder's source file (tfds' own lookup needs the ``importlib_resources`` package)."""
    return epath.Path(inspect.getfile(cls))

  @classmethod
  def declared_features(cls, config: tfds.core.BuilderConfig | None) -> tfds.features.FeaturesDict:
    """The features of every example under ``config`` (None for builders without configs)."""
    raise NotImplementedError

  @classmethod
  def declared_split_sizes(cls, config: tfds.core.BuilderConfig | None) -> dict[str, int]:
    """``{split: number of examples}`` that preparing under ``config`` produces."""
    raise NotImplementedError

  def download_and_prepare(self, **kwargs) -> None:
    """tfds' ``download_and_prepare``, without progress bars."""
    with no_progress_bars():
      super().download_and_prepare(**kwargs)

  def _log_download_bytes(self) -> None:
    logging.info("Preparing dataset %s in %s", self.name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("Dataset %s prepared in %s", self.name, self.data_dir)
