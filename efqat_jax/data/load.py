"""``load``: this package's datasets (built on first use) or any tfds catalog name."""

from __future__ import annotations

from typing import Any

import tensorflow_datasets as tfds

from efqat_jax.data.digits import Digits
from efqat_jax.data.mnist5k import Mnist5k
from efqat_jax.data.shakespeare_char import ShakespeareChar

BUILDERS = {cls.name: cls for cls in (Mnist5k, Digits, ShakespeareChar)}


def builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """This package's builder for ``name`` or ``name/config`` (e.g. ``"shakespeare_char/seq64"``)."""
  base, _, config = name.partition("/")
  if base not in BUILDERS:
    raise ValueError(f"unknown dataset {base!r}; bundled datasets are {sorted(BUILDERS)}")
  return BUILDERS[base](data_dir=data_dir, config=config or None)


def load(name: str, data_dir: str | None, split: str) -> Any:
  """A random-access data source for ``split``, preparing the dataset first if needed.

  Bundled names (``mnist5k``, ``digits``, ``shakespeare_char[/config]``) are built from
  package data into ``data_dir`` as array_record, with no TensorFlow. Any other name goes to
  ``tfds.data_source`` (standard catalog datasets such as ``"mnist"`` may need TensorFlow
  and internet access to prepare, and must be prepared in an array_record format).

  Args:
    name: dataset name, optionally with ``/config``.
    data_dir: tfds data dir (None: tfds' default, ``~/tensorflow_datasets``).
    split: split name or tfds split expression, e.g. ``"train"`` or ``"train[:10%]"``.

  Returns:
    A ``tfds`` ``ArrayRecordDataSource`` (``len`` and ``source[i]`` give numpy examples).
  """
  if name.partition("/")[0] not in BUILDERS:
    return tfds.data_source(name, data_dir=data_dir, split=split)
  b = builder(name, data_dir)
  b.download_and_prepare()
  return b.as_data_source(split=split)
