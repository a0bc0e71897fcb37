"""Parsing and validation of labeled image tables, and the stratified split."""

import gzip

import numpy as np
import pytest

from efqat_jax.data import tables


def _csv(tmp_path, rows):
  path = tmp_path / "table.csv.gz"
  with gzip.open(path, "wt") as f:
    f.write("\n".join(",".join(r) for r in rows) + "\n")
  return tables.read_table(path)


def _parse(table):
  return tables.parse_labeled_images(table, (2, 2, 1), max_value=16, num_classes=10)


def test_valid_table_parses_to_uint8_images_and_int_labels(tmp_path):
  images, labels = _parse(_csv(tmp_path, [["0", "16", "3", "4", "7"], ["1", "2", "3", "4", "0"]]))
  assert images.dtype == np.uint8 and images.shape == (2, 2, 2, 1)
  assert images[0, :, :, 0].tolist() == [[0, 16], [3, 4]]
  assert labels.tolist() == [7, 0]


@pytest.mark.parametrize(
  "row,match",
  [
    (["0", "nan", "3", "4", "7"], "pixel values contain NaN"),
    (["0", "1.5", "3", "4", "7"], "pixel values must be integers"),
    (["0", "17", "3", "4", "7"], r"pixel values must be in \[0, 16\]"),
    (["-1", "1", "3", "4", "7"], r"pixel values must be in \[0, 16\]"),
    (["0", "1", "3", "4", "10"], r"label values must be in \[0, 9\]"),
    (["0", "1", "3", "4", "-1"], r"label values must be in \[0, 9\]"),
    (["0", "1", "3", "4", "2.5"], "label values must be integers"),
    (["0", "1", "3", "7"], "columns"),
  ],
)
def test_corrupted_table_raises_naming_the_problem(tmp_path, row, match):
  with pytest.raises(ValueError, match=match):
    _parse(_csv(tmp_path, [["1", "2", "3", "4", "5"], row]))


def test_empty_table_raises():
  with pytest.raises(ValueError, match="empty"):
    _parse(np.zeros((0, 5)))


def test_missing_package_raises_with_install_hint():
  with pytest.raises(FileNotFoundError, match="pip install some-dist"):
    tables.package_data_file("no_such_package_xyz", "a.csv", pip_name="some-dist")


def test_stratified_split_is_a_fixed_partition_with_class_proportions():
  labels = np.repeat(np.arange(3), [50, 30, 20])
  train, test = tables.stratified_split(labels, 10, seed=0)
  assert len(test) == 10 and len(train) == 90
  assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))
  assert np.bincount(labels[test]).tolist() == [5, 3, 2]
  again = tables.stratified_split(labels, 10, seed=0)
  assert np.array_equal(again[1], test)
  assert not np.array_equal(tables.stratified_split(labels, 10, seed=1)[1], test)


def test_stratified_split_rounds_to_the_exact_test_size():
  labels = np.repeat(np.arange(3), [7, 7, 7])
  _, test = tables.stratified_split(labels, 10)
  assert len(test) == 10 and np.bincount(labels[test]).tolist() == [4, 3, 3]


@pytest.mark.parametrize("num_test", [0, 21])
def test_stratified_split_rejects_bad_test_size(num_test):
  with pytest.raises(ValueError, match="num_test"):
    tables.stratified_split(np.zeros(21, int), num_test)
