"""``describe``: a split's size and features from metadata alone; it writes and prepares nothing."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from efqat_jax.data.bundled import BUILDERS, DatasetName, bundled_config, parse_name
from efqat_jax.errors import DataError

FeatureSpecs = dict[str, tuple[tuple[int | None, ...], str]]
_SPLIT_EXAMPLES = "'train', 'train[:10%]', 'train[100:200]', 'train+test'"


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  """What a split (or split expression) holds.

  Attributes:
    num_examples: examples the split expression selects.
    features: ``{feature: (shape of one example, numpy dtype name)}`` as the data source returns
      them (``np.asarray(example[feature])``); ``None`` marks a variable dimension and nested
      features are named ``"outer/inner"``. The batching code adds ``mask``, which is not listed.
  """

  num_examples: int
  features: FeatureSpecs


def feature_specs(features: tfds.features.FeaturesDict) -> FeatureSpecs:
  """``{name: (shape, dtype name)}`` of a tfds ``FeaturesDict``, nested dicts flattened."""

  def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, Mapping):
      return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}/").items()}

  shapes = {k.rstrip("/"): v for k, v in flat(features.shape).items()}
  dtypes = {k.rstrip("/"): v for k, v in flat(features.np_dtype).items()}
  return {k: (tuple(shapes[k]), np.dtype(dtypes[k]).name) for k in shapes}


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def num_examples(dataset: str, split: str, splits: Mapping[str, tfds.core.SplitInfo]) -> int:
  """Examples selected by a tfds split expression, resolved by tfds' own split machinery.

  Args:
    dataset: name, for messages.
    split: e.g. ``"train"``, ``"train[:10%]"``, ``"train[100:200]"``, ``"train+test"``, ``"all"``.
    splits: ``{split name: tfds SplitInfo}`` (``num_examples`` and ``shard_lengths`` are used).

  Raises:
    DataError: a malformed expression, an unknown split name, an out-of-range or reversed
      slice, or an empty selection.
  """
  allowed = sorted(splits)
  try:
    instruction = tfds.core.ReadInstruction.from_spec(split)
  except Exception as e:  # tfds raises ValueError/NotImplementedError with long text
    raise DataError(
      f"split {split!r} of {dataset} is not a split expression like {_SPLIT_EXAMPLES}; "
      f"splits are {allowed}"
    ) from e
  for name in (part.partition("[")[0] for part in re.split(r"\s*\+\s*", split)):
    if name != "all" and name not in splits:
      raise DataError(f"split {name!r} of {dataset} is not one of {allowed}")
  try:
    absolute = instruction.to_absolute(dict(splits))
  except ValueError as e:  # e.g. "Requested slice [:6000] incompatible with 4000 examples."
    raise DataError(f"split {split!r} of {dataset}: {_first_line(e)}") from e
  total = 0
  for a in absolute:
    start, stop = a.from_ or 0, splits[a.splitname].num_examples if a.to is None else a.to
    if stop < start:  # tfds would build a source of negative length
      raise DataError(f"split {split!r} of {dataset} selects a reversed range [{start}:{stop}]")
    total += stop - start
  if not total:  # tfds' array_record source cannot be built over no files
    raise DataError(f"split {split!r} of {dataset} selects no examples")
  return total


def default_data_dir() -> epath.Path:
  """tfds' default data dir (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
  return epath.Path(tfds.core.constants.DATA_DIR).expanduser()


def _versions(folder: epath.Path) -> list[epath.Path]:
  """Prepared version folders (with dataset_info.json and features.json), oldest first."""
  if not folder.is_dir():
    return []
  found = [
    p
    for p in folder.iterdir()
    if tfds.core.Version.is_valid(p.name)
    and (p / "dataset_info.json").is_file()
    and (p / "features.json").is_file()
  ]
  return sorted(found, key=lambda p: tfds.core.Version(p.name))


def _not_prepared(name: str, root: epath.Path) -> DataError:
  base = name.partition("/")[0].partition(":")[0]
  return DataError(
    f"dataset {name!r} is neither bundled ({', '.join(sorted(BUILDERS))}) nor prepared in "
    f"{root}; prepare a tfds catalog dataset with `tfds build {base} --data_dir={root} "
    "--file_format=array_record`"
  )


def prepared_dir(name: DatasetName, data_dir: str | None) -> epath.Path:
  """The folder of a prepared non-bundled dataset (``root/name[/config]/version``).

  Without a config, the dataset's folder holds the versions, or tfds' recorded default config
  is used. Without a version, the newest prepared one.

  Raises:
    DataError: nothing prepared there, or configs exist and none is named or recorded as default.
  """
  root = epath.Path(data_dir).expanduser() if data_dir else default_data_dir()
  full = name.base + (f"/{name.config}" if name.config else "")
  folder = root / name.base
  config = name.config
  if config is None and not _versions(folder) and folder.is_dir():
    config = tfds.core.dataset_builder.load_default_config_name(folder)
    configs = sorted(p.name for p in folder.iterdir() if _versions(p))
    if config is None and configs:
      raise DataError(
        f"dataset {name.base!r} in {root} has configs {configs}; name one, e.g. "
        f"'{name.base}/{configs[0]}'"
      )
  if config is not None:
    folder = folder / config
  versions = [v for v in _versions(folder) if name.version in (None, v.name)]
  if not versions:
    raise _not_prepared(full + (f":{name.version}" if name.version else ""), root)
  return versions[-1]


def read_prepared(folder: epath.Path) -> tfds.core.DatasetBuilder:
  """A read-only tfds builder over a prepared folder; DataError if unreadable or not array_record."""
  try:
    proto = tfds.core.dataset_info.read_proto_from_builder_dir(folder)
  except Exception as e:  # a damaged json file: any parse error
    raise DataError(
      f"cannot read {folder / 'dataset_info.json'} ({type(e).__name__}); "
      f"delete {folder} and prepare it again"
    ) from e
  formats = {proto.file_format, *proto.alternative_file_formats}
  if "array_record" not in formats:
    raise DataError(
      f"{folder} holds {sorted(f for f in formats if f)} files; data sources need array_record: "
      f"prepare it again with `tfds build {proto.name} --file_format=array_record`"
    )
  try:
    return tfds.builder_from_directory(folder, file_format="array_record")
  except Exception as e:  # e.g. a damaged features.json
    raise DataError(f"cannot read the metadata in {folder}: {_first_line(e)}") from e


def _bundled(name: DatasetName, split: str) -> SplitInfo:
  cls, config = bundled_config(name)
  sizes = cls.declared_split_sizes(config)
  infos = {s: tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0) for s, n in sizes.items()}
  return SplitInfo(
    num_examples(name.base, split, infos), feature_specs(cls.declared_features(config))
  )


def describe(name: str, data_dir: str | None, split: str) -> SplitInfo:
  """Size and features of ``split`` of dataset ``name``, without writing or preparing anything.

  Bundled datasets (``mnist5k``, ``digits``, ``shakespeare_char[/config]``) are described from
  their builders' declarations, prepared or not. Any other name must already be prepared in
  ``data_dir`` (as array_record); its ``dataset_info.json`` and ``features.json`` are read.

  Args:
    name: ``name[/config][:version]``.
    data_dir: tfds data dir (None: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    split: split name or tfds split expression, e.g. ``"train[:10%]"``.

  Raises:
    DataError: (one line) an invalid or unknown name, config or version, a dataset that is not
      prepared, an unknown split, a malformed or out-of-range split expression.
  """
  parsed = parse_name(name)
  if not isinstance(split, str):
    raise DataError(f"split of {name} must be a string like {_SPLIT_EXAMPLES}, got {split!r}")
  if parsed.base in BUILDERS:
    return _bundled(parsed, split)
  info = read_prepared(prepared_dir(parsed, data_dir)).info
  return SplitInfo(num_examples(name, split, info.splits), feature_specs(info.features))
