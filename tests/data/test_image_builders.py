"""mnist5k and digits: split sizes, dtypes, shapes, label and pixel ranges, no TensorFlow."""

import importlib.util
import pathlib
import sys
from collections import Counter

import numpy as np
import pytest
import tensorflow_datasets as tfds

from efqat_jax import data

CASES = [
  # name, train size, test size, image shape, pixel max, test examples per class
  ("mnist5k", 4000, 1000, (28, 28, 1), 255, [100] * 10),
  ("digits", 1437, 360, (8, 8, 1), 16, [36, 37, 35, 37, 36, 36, 36, 36, 35, 36]),
]


def _arrays(source):
  examples = source.__getitems__(list(range(len(source))))
  return np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples])


@pytest.mark.parametrize("name,n_train,n_test,shape,pixel_max,per_class", CASES)
def test_image_dataset_splits_shapes_and_ranges(
  prepared, name, n_train, n_test, shape, pixel_max, per_class
):
  sources = prepared(name)
  assert {k: len(v) for k, v in sources.items()} == {"train": n_train, "test": n_test}
  for split, source in sources.items():
    images, labels = _arrays(source)
    assert images.dtype == np.uint8 and images.shape == (len(source), *shape), split
    assert images.max() == pixel_max and images.min() == 0, split
    assert labels.min() == 0 and labels.max() == 9, split
    assert source.dataset_info.metadata["pixel_max"] == pixel_max
  _, test_labels = _arrays(sources["test"])
  assert np.bincount(test_labels).tolist() == per_class  # stratified split


@pytest.mark.parametrize("name", ["mnist5k", "digits"])
def test_train_and_test_are_disjoint_and_cover_the_table(prepared, name):
  # (image, label) rows counted with multiplicity (the table may repeat an image): train and test
  # partition the table iff their counts add up to the table's. A set would miss an overlap.
  def rows(imgs, lbls):
    return Counter(i.tobytes() + bytes([int(y)]) for i, y in zip(imgs, lbls, strict=True))

  train = rows(*_arrays(prepared(name)["train"]))
  test = rows(*_arrays(prepared(name)["test"]))
  assert train + test == rows(*data.BUILDERS[name]().load_arrays())


def _files(folder):
  """``{path: (inode, mtime)}`` of every file under ``folder``."""
  return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_load_reuses_prepared_data_and_tfds_data_source_reads_it(prepared, data_dir):
  test = prepared("digits")["test"]
  before = _files(pathlib.Path(data_dir, "digits"))
  assert any(p.name.startswith("digits-test.array_record") for p in before)
  source = data.load("digits", data_dir, "test")
  assert _files(pathlib.Path(data_dir, "digits")) == before  # nothing rebuilt or rewritten
  assert len(source) == 360
  images, labels = _arrays(source)
  want_images, want_labels = _arrays(test)
  np.testing.assert_array_equal(images, want_images)
  np.testing.assert_array_equal(labels, want_labels)
  head = tfds.data_source("digits", data_dir=data_dir, split="train[:100]")
  assert len(head) == 100
  np.testing.assert_array_equal(_arrays(head)[0], _arrays(prepared("digits")["train"])[0][:100])


def test_unknown_bundled_builder_raises_naming_choices():
  with pytest.raises(ValueError, match="mnist5k"):
    data.builder("no_such_dataset")


@pytest.mark.skipif(
  importlib.util.find_spec("tensorflow") is not None,
  reason="checks the TF-free path; with TF installed tfds may import it lazily",
)
def test_building_and_reading_does_not_import_tensorflow(prepared):
  prepared("mnist5k")["train"][0]
  assert "tensorflow" not in sys.modules
