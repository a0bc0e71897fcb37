"""load: quiet preparation of bundled data; damaged or missing files give a one-line DataError."""

import pathlib
import shutil
import tempfile

import pytest

from efqat_jax import data
from efqat_jax.data import verify
from efqat_jax.errors import DataError


def test_bundled_preparation_prints_nothing_and_leaves_no_temporary_dirs(
  tmp_path, capfd, monkeypatch
):
  scratch = tmp_path / "system_tmp"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the system's temporary folder
  for name, split, size in (
    ("digits", "test", 360),
    ("shakespeare_char/seq64", "validation", None),
  ):
    source = data.load(name, str(tmp_path / "data"), split)
    assert size is None or len(source) == size
  assert capfd.readouterr() == ("", "")  # no "Downloading and preparing", no progress bars
  assert list(scratch.iterdir()) == []  # no empty dir from tfds' GCS bucket lookup


@pytest.fixture
def copy(prepared, data_dir, tmp_path):
  """A data dir holding a copy of the session's prepared mnist5k, for a test to damage."""
  prepared("mnist5k")
  root = tmp_path / "tfds"
  shutil.copytree(pathlib.Path(data_dir, "mnist5k"), root / "mnist5k")
  return root


def _shard(root, split):
  (path,) = (root / "mnist5k" / "1.0.0").glob(f"mnist5k-{split}.array_record-*")
  return path


def _truncate(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_middle(path):
  raw = bytearray(path.read_bytes())
  mid = len(raw) // 2
  raw[mid : mid + 16] = bytes(b ^ 0xFF for b in raw[mid : mid + 16])
  path.write_bytes(bytes(raw))


def _remove(path):
  path.unlink()


@pytest.mark.parametrize(
  "damage,reason",
  [
    (_truncate, "cannot read its index"),
    (_garble_middle, "chunk data hash mismatch"),
    (_remove, "the file is missing"),
  ],
)
def test_damaged_data_file_raises_naming_it(copy, damage, reason):
  path = _shard(copy, "train")
  damage(path)
  with pytest.raises(DataError) as error:
    data.load("mnist5k", str(copy), "train[:10]")
  message = str(error.value)
  assert str(path) in message and reason in message and "\n" not in message
  assert f"delete {path.parent} to rebuild it" in message
  assert len(data.load("mnist5k", str(copy), "test")) == 1000  # the intact split still loads


def test_deleting_the_dataset_dir_rebuilds_it(prepared, data_dir, tmp_path):
  prepared("digits")
  shutil.copytree(pathlib.Path(data_dir, "digits"), tmp_path / "digits")
  (shard,) = tmp_path.glob("digits/1.0.0/digits-test.array_record-*")
  _truncate(shard)
  with pytest.raises(DataError, match=f"delete {shard.parent} to rebuild it"):
    data.load("digits", str(tmp_path), "test")
  shutil.rmtree(shard.parent)
  assert len(data.load("digits", str(tmp_path), "test")) == 360


def test_damaged_dataset_info_raises(copy):
  (copy / "mnist5k" / "1.0.0" / "dataset_info.json").write_text('{"name": ')
  with pytest.raises(DataError, match=r"cannot read the prepared mnist5k in .*delete") as error:
    data.load("mnist5k", str(copy), "train")
  assert "\n" not in str(error.value)


def test_large_splits_get_the_cheap_check(copy, monkeypatch):
  # Above FULL_CHECK_MAX_BYTES only the index, the record count and the end records are read:
  # a truncated file is still caught, a damaged chunk in the middle is left to the reads.
  monkeypatch.setattr(verify, "FULL_CHECK_MAX_BYTES", 0)
  _garble_middle(_shard(copy, "train"))
  assert len(data.load("mnist5k", str(copy), "train")) == 4000
  _truncate(_shard(copy, "test"))
  with pytest.raises(DataError, match="cannot read its index"):
    data.load("mnist5k", str(copy), "test")
