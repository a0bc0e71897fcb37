"""Base class of this package's tfds builders: array_record files, read without TensorFlow."""

from __future__ import annotations

import inspect

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A ``GeneratorBasedBuilder`` that writes ``array_record`` (random access, no TF needed).

  Read the result with ``builder.as_data_source()`` or ``tfds.data_source(name, data_dir=...)``.
  """

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """The builder's source file (tfds' own lookup needs the ``importlib_resources`` package)."""
    return epath.Path(inspect.getfile(cls))
