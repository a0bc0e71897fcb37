"""describe: split sizes and features from metadata alone; one-line DataErrors; writes nothing."""

import json
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from efqat_jax import data
from efqat_jax.data.array_record_builder import ArrayRecordBuilder, LocalDatasetInfo
from efqat_jax.data.bundled import bundled_config, parse_name
from efqat_jax.data.describe import feature_specs
from efqat_jax.errors import DataError

BUNDLED = ["mnist5k", "digits", "shakespeare_char/seq256", "shakespeare_char/seq64"]


def _example_specs(example):
  return {k: (np.asarray(v).shape, np.asarray(v).dtype.name) for k, v in example.items()}


@pytest.mark.parametrize("name", BUNDLED)
def test_declared_metadata_equals_the_prepared_dataset(prepared, data_dir, name):
  sources = prepared(name)
  cls, config = bundled_config(parse_name(name))
  assert cls.declared_split_sizes(config) == {split: len(s) for split, s in sources.items()}
  for split, source in sources.items():
    info = data.describe(name, data_dir, split)
    assert info.num_examples == len(source), split
    assert info.features == feature_specs(source.dataset_info.features), split
    for i in (0, len(source) - 1):  # what the data source really returns
      assert _example_specs(source[i]) == info.features, (split, i)


def test_mnist5k_train_features():
  assert data.describe("mnist5k", None, "train") == data.SplitInfo(
    4000, {"image": ((28, 28, 1), "uint8"), "label": ((), "int64")}
  )
  assert data.describe("shakespeare_char", None, "validation").features == {
    "tokens": ((256,), "int32")
  }


@pytest.mark.parametrize(
  "split",
  [
    "train",
    "train[:10%]",
    "train[100:200]",
    "train+test",
    "test[-7:]",
    "train[33%:34%]",
    "train[:10%]+test[50%:]",
    "all",
    "train[100:101]+test[:0]",
  ],
)
def test_split_expressions_count_what_the_data_source_reads(prepared, data_dir, split):
  prepared("mnist5k")
  assert data.describe("mnist5k", data_dir, split).num_examples == len(
    data.load("mnist5k", data_dir, split)
  )


def _files(folder):
  return sorted(p for p in pathlib.Path(folder).rglob("*"))


@pytest.mark.parametrize(
  "name,split,message",
  [
    ("mnist5k", "tset", "split 'tset' of mnist5k is not one of ['test', 'train']"),
    ("shakespeare_char/seq64", "test", "split 'test' of shakespeare_char is not one of"),
    ("mnist5k", "train+tset", "split 'tset' of mnist5k is not one of"),
    ("mnist5k", "train[::2]", "split 'train[::2]' of mnist5k is not a split expression"),
    ("mnist5k", "train[0]", "is not a split expression"),
    ("mnist5k", "", "is not a split expression"),
    ("mnist5k", "train[:6000]", "incompatible with 4000 examples"),
    ("mnist5k", "train[200:100]", "selects a reversed range [200:100]"),
    ("mnist5k", "test[60%:-50%]", "selects a reversed range [600:500]"),
    ("mnist5k", "test[:0]", "split 'test[:0]' of mnist5k selects no examples"),
    ("mnist5k", "train[7:7]", "selects no examples"),
    ("mnist5k/seq64", "train", "config 'seq64' of mnist5k is not allowed; configs: none"),
    ("shakespeare_char/seq8", "train", "configs: one of ['seq256', 'seq64']"),
    ("mnist5k:2.0.0", "train", "version 2.0.0 of mnist5k is not available"),
    ("mnist", "train", "dataset 'mnist' is neither bundled (digits, mnist5k, shakespeare_char)"),
    ("no_such_set", "train", "tfds build no_such_set --data_dir="),
    ("../mnist5k", "train", "is not of the form name[/config][:x.y.z]"),
    ("MNIST", "train", "is not of the form"),
  ],
)
def test_bad_names_and_splits_raise_one_line_and_write_nothing(
  tmp_path, capfd, name, split, message
):
  for fn in (data.describe, data.load):
    with pytest.raises(DataError) as error:
      fn(name, str(tmp_path), split)
    assert message in str(error.value) and "\n" not in str(error.value)
  assert _files(tmp_path) == []  # nothing prepared, no catalog builder imported
  assert capfd.readouterr() == ("", "")  # no tfds catalog listing


def test_describe_writes_nothing_even_for_an_absent_data_dir(tmp_path):
  for name in BUNDLED:
    data.describe(name, str(tmp_path / "absent"), "train[:5]")
  assert _files(tmp_path) == []


# A dataset prepared by tfds but not bundled: read from its dataset_info.json / features.json.
class ToyPoints(ArrayRecordBuilder, skip_registration=True):
  """2-d points with a label; configs differ in size."""

  name = "toy_points"
  VERSION = tfds.core.Version("1.2.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="small"), tfds.core.BuilderConfig(name="big")]
  SIZES = {"small": {"train": 30, "eval": 7}, "big": {"train": 90, "eval": 11}}

  def _info(self):
    features = tfds.features.FeaturesDict(
      {
        "x": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        "meta": {"id": tfds.features.Tensor(shape=(), dtype=np.int32)},
        "label": tfds.features.ClassLabel(num_classes=3),
      }
    )
    return LocalDatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    sizes = self.SIZES[self.builder_config.name]
    return {split: self._generate_examples(n) for split, n in sizes.items()}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"x": np.full(2, i, np.float32), "meta": {"id": i}, "label": i % 3}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("toy")
  for config in ("small", "big"):
    ToyPoints(data_dir=str(root), config=config).download_and_prepare()
  return root


def test_prepared_catalog_dataset_is_described_from_its_metadata(toy_dir):
  before = {p: p.stat().st_mtime_ns for p in _files(toy_dir)}
  info = data.describe("toy_points/big", str(toy_dir), "train[:10%]+eval")
  assert info == data.SplitInfo(
    9 + 11,
    {"x": ((2,), "float32"), "meta/id": ((), "int32"), "label": ((), "int64")},
  )
  # No config: the default recorded by tfds (the first); a version can be named.
  assert data.describe("toy_points", str(toy_dir), "train").num_examples == 30
  assert data.describe("toy_points/small:1.2.0", str(toy_dir), "eval").num_examples == 7
  with pytest.raises(DataError, match=r"split 'test' of toy_points/big is not one of \['eval'"):
    data.describe("toy_points/big", str(toy_dir), "test")
  with pytest.raises(DataError, match="'toy_points/big:1.0.0' is neither bundled"):
    data.describe("toy_points/big:1.0.0", str(toy_dir), "train")
  assert {p: p.stat().st_mtime_ns for p in _files(toy_dir)} == before


def test_prepared_catalog_dataset_loads(toy_dir):
  whole = data.load("toy_points/big", str(toy_dir), "eval")
  part = data.load("toy_points/big", str(toy_dir), "eval[2:5]")
  assert len(whole) == 11 and len(part) == 3
  ids = lambda examples: [int(e["meta"]["id"]) for e in examples]
  assert ids(part.__getitems__([0, 1, 2])) == ids(whole.__getitems__([2, 3, 4]))
  np.testing.assert_array_equal(part[0]["x"], np.full(2, ids([part[0]])[0], np.float32))


def test_catalog_dataset_with_configs_but_no_default_needs_a_config(toy_dir, tmp_path):
  root = tmp_path / "copy"
  shutil.copytree(toy_dir, root)
  shutil.rmtree(root / "toy_points" / ".config")  # where tfds records the default config
  with pytest.raises(DataError, match=r"has configs \['big', 'small'\]; name one"):
    data.describe("toy_points", str(root), "train")


def test_catalog_dataset_in_another_file_format_raises(toy_dir, tmp_path):
  root = tmp_path / "copy"
  shutil.copytree(toy_dir, root)
  info_path = root / "toy_points" / "small" / "1.2.0" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info_path.write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
  for fn in (data.describe, data.load):
    with pytest.raises(
      DataError, match="holds \\['tfrecord'\\] files; data sources need array_record"
    ):
      fn("toy_points/small", str(root), "train")
  info_path.write_text("{not json")
  with pytest.raises(DataError, match="cannot read .*dataset_info.json"):
    data.describe("toy_points/small", str(root), "train")
  (root / "toy_points" / "big" / "1.2.0" / "features.json").write_text("[]")
  with pytest.raises(DataError, match="cannot read the metadata in .*big"):
    data.describe("toy_points/big", str(root), "train")
