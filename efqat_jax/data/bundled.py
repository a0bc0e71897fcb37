"""This package's datasets by name, and the names users may pass (``name[/config][:version]``)."""

from __future__ import annotations

import dataclasses
import re

import tensorflow_datasets as tfds

from efqat_jax.data.array_record_builder import ArrayRecordBuilder
from efqat_jax.data.digits import Digits
from efqat_jax.data.mnist5k import Mnist5k
from efqat_jax.data.shakespeare_char import ShakespeareChar
from efqat_jax.errors import DataError

BUILDERS: dict[str, type[ArrayRecordBuilder]] = {
  cls.name: cls for cls in (Mnist5k, Digits, ShakespeareChar)
}

_NAME_RE = re.compile(
  r"(?P<base>[a-z][a-z0-9_]*)(?:/(?P<config>\w[\w.-]*))?(?::(?P<version>\d+\.\d+\.\d+))?"
)


@dataclasses.dataclass(frozen=True)
class DatasetName:
  """A parsed ``name[/config][:version]``."""

  base: str
  config: str | None = None
  version: str | None = None


def parse_name(name: str) -> DatasetName:
  """Splits a dataset name; raises DataError if it is not ``name[/config][:x.y.z]``."""
  match = _NAME_RE.fullmatch(name) if isinstance(name, str) else None
  if not match:
    raise DataError(
      f"dataset name {name!r} is not of the form name[/config][:x.y.z] (lowercase name); "
      f"bundled datasets are {sorted(BUILDERS)}"
    )
  return DatasetName(**match.groupdict())


def bundled_config(
  name: DatasetName,
) -> tuple[type[ArrayRecordBuilder], tfds.core.BuilderConfig | None]:
  """The builder class and config of a bundled ``name``; DataError for an unknown config/version."""
  cls = BUILDERS[name.base]
  configs = cls.builder_configs
  if name.config is not None and name.config not in configs:
    allowed = f"one of {sorted(configs)}" if configs else "none (it has no configs)"
    raise DataError(f"config {name.config!r} of {name.base} is not allowed; configs: {allowed}")
  if name.version is not None and name.version != str(cls.VERSION):
    raise DataError(f"version {name.version} of {name.base} is not available; it is {cls.VERSION}")
  if not configs:
    return cls, None
  return cls, configs[name.config or cls.default_builder_config.name]


def builder(name: str, data_dir: str | None = None) -> ArrayRecordBuilder:
  """This package's builder for ``name`` or ``name/config`` (e.g. ``"shakespeare_char/seq64"``)."""
  parsed = parse_name(name)
  if parsed.base not in BUILDERS:
    raise DataError(f"unknown dataset {parsed.base!r}; bundled datasets are {sorted(BUILDERS)}")
  cls, config = bundled_config(parsed)
  return cls(data_dir=data_dir, config=config.name if config else None)
