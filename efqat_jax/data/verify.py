"""Checks that a prepared split's array_record files are intact before anything reads them."""

from __future__ import annotations

import os

import tensorflow_datasets as tfds
from array_record.python import array_record_module

from efqat_jax.errors import DataError

# Up to this many bytes per split every record is read, so any damaged chunk is found
# (about 40 ms per MB on 2 CPU cores; every bundled split fits). Above it only each file's
# index, record count, first and last record are checked.
FULL_CHECK_MAX_BYTES = 16 * 2**20


def shard_problem(path: str, num_records: int, read_all: bool) -> str | None:
  """Why the array_record file at ``path`` is unreadable, or None if it is intact.

  Args:
    path: the file.
    num_records: records the dataset_info says it holds.
    read_all: read (and so hash-check) every record, not only the first and the last.
  """
  if not os.path.isfile(path):
    return "the file is missing"
  try:
    reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
  except RuntimeError as e:  # e.g. "ArrayRecord file should be at least 64KB big"
    return _short(e) or "cannot open it"
  problem = _records_problem(reader, num_records, read_all)
  try:
    reader.close()
  except RuntimeError as e:  # a reader that failed to open may say why when closed
    reason = _short(e)
    if problem and reason:
      problem = f"{problem} ({reason})"
    elif not problem:
      problem = reason or "closing it failed"
  return problem


def _records_problem(reader, num_records: int, read_all: bool) -> str | None:
  if not reader.ok():
    return "cannot read its index, it may be truncated"
  if reader.num_records() != num_records:
    return f"it holds {reader.num_records()} records, its dataset_info says {num_records}"
  try:
    if read_all:
      reader.read_all()
    elif num_records:
      reader.read([0, num_records - 1])
  except RuntimeError as e:  # e.g. "Corrupted Riegeli/records file: chunk data hash mismatch"
    return _short(e) or "cannot read its records"
  return None


def _short(error: Exception) -> str:
  """The first clause of a riegeli/array_record message (they run on with hashes and offsets)."""
  first = (str(error).strip().splitlines() or [""])[0]
  return first.split(" (")[0].split(";")[0]


def verify_split(info: tfds.core.DatasetInfo, split: str, remedy: str) -> None:
  """Raises DataError naming the first damaged or missing file that ``split`` reads.

  Args:
    info: the prepared dataset's info (its splits give the files and record counts).
    split: split name or expression (already checked by :func:`efqat_jax.data.describe`).
    remedy: the end of the message, e.g. ``"delete <dir> to rebuild it"``.
  """
  shards = {fi.filename: fi.examples_in_shard for fi in info.splits[split].file_instructions}
  sizes = [os.path.getsize(p) if os.path.isfile(p) else 0 for p in shards]
  read_all = sum(sizes) <= FULL_CHECK_MAX_BYTES
  for path, num_records in shards.items():
    problem = shard_problem(path, num_records, read_all)
    if problem:
      raise DataError(f"dataset file {path} is unreadable: {problem}; {remedy}")
