"""Config fields declared with their default, meaning and allowed values.

Each component of the pipeline (a stage, a PTQ method, a QAT variant) declares the fields of
its config block; the pipeline's config, its validation and its field listing are built from
these declarations, so a new component brings its fields with it.

Example:
  >>> SCHEMA = {"steps": Field(300, "training steps", integer(0)), "opt": {"lr": Field(...)}}
  >>> config = to_config(SCHEMA); config.steps = -1
  >>> validate(config, SCHEMA)   # ConfigError: config.steps = -1 is not allowed: an integer >= 0
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections

from efqat_jax.errors import ConfigError
from efqat_jax.registry import nearest


@dataclasses.dataclass(frozen=True)
class Check:
  """Which values a field allows: ``ok(value)``, and ``allowed`` to say so in an error."""

  allowed: str
  ok: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
  if lo is not None and hi is not None:
    allowed = f"an integer in {lo}..{hi}"
  elif lo is not None:
    allowed = "a positive integer" if lo == 1 else f"an integer >= {lo}"
  else:
    allowed = "an integer"
  ok = lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
  return Check(allowed, ok)


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Check:
  """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
  parts = []
  if lo is not None:
    parts.append(f"{'>' if lo_open else '>='} {lo:g}")
  if hi is not None:
    parts.append(f"<= {hi:g}")
  allowed = "a finite number" + (" " + " and ".join(parts) if parts else "")

  def ok(v):
    if not _is_number(v):
      return False
    above = lo is None or (v > lo if lo_open else v >= lo)
    return above and (hi is None or v <= hi)

  return Check(allowed, ok)


def one_of(*values: Any) -> Check:
  return Check(
    f"one of {list(values)}", lambda v: any(v == x and type(v) is type(x) for x in values)
  )


def boolean() -> Check:
  return Check("True or False", lambda v: isinstance(v, bool))


def text() -> Check:
  return Check("a string", lambda v: isinstance(v, str))


def regex(extra: str = "") -> Check:
  def ok(v):
    if not isinstance(v, str):
      return False
    try:
      re.compile(v)
    except re.error:
      return False
    return True

  return Check(f"{extra}a valid regular expression" if extra else "a valid regular expression", ok)


def mapping() -> Check:
  return Check(
    "a mapping of keyword arguments", lambda v: isinstance(v, dict | ml_collections.ConfigDict)
  )


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field.

  Attributes:
    default: its value when the config does not set it.
    meaning: one line for the field listing.
    check: the allowed values.
    free: a mapping whose keys are not declared (e.g. a model's keyword arguments).
  """

  default: Any
  meaning: str
  check: Check
  free: bool = False


Schema = dict  # name -> Field | Schema


def to_config(schema: Schema) -> ml_collections.ConfigDict:
  """A type-safe ConfigDict holding every field's default."""
  config = ml_collections.ConfigDict()
  for name, item in schema.items():
    if isinstance(item, Field):
      default = item.default
      if item.free:
        default = ml_collections.ConfigDict(dict(default), type_safe=False)
      config[name] = default
    else:
      config[name] = to_config(item)
  return config


def walk(schema: Schema, prefix: str = "") -> Iterator[tuple[str, Field]]:
  """``(dotted name, field)`` for every field, in declaration order."""
  for name, item in schema.items():
    if isinstance(item, Field):
      yield prefix + name, item
    else:
      yield from walk(item, f"{prefix}{name}.")


def lookup(schema: Schema, dotted: str) -> Field | Schema | None:
  """The field or block at ``dotted`` (None if there is none)."""
  item: Any = schema
  for part in dotted.split("."):
    if not isinstance(item, dict) or part not in item:
      return None
    item = item[part]
  return item


def unknown_field_error(dotted: str, schema: Schema) -> ConfigError:
  """``config.<dotted>`` is not a field: the error lists the nearest valid names."""
  names = [name for name, _ in walk(schema)]
  head, _, _ = dotted.rpartition(".")
  siblings = [n for n in names if n.rpartition(".")[0] == head] or names
  hint = nearest(dotted, names) or f" (fields here: {', '.join(siblings)})"
  return ConfigError(f"config.{dotted} is not a config field{hint}")


def validate(
  config: ml_collections.ConfigDict, schema: Schema, *, root: Schema | None = None, prefix: str = ""
) -> None:
  """Raises ConfigError for the first unknown field or field with a value it does not allow."""
  root = schema if root is None else root
  for key in config:
    if key not in schema:
      raise unknown_field_error(prefix + key, root)
  for name, item in schema.items():
    dotted = prefix + name
    if name not in config:
      raise ConfigError(
        f"config.{dotted} is missing (configs start from efqat_jax.config.base_config())"
      )
    value = config[name]
    if isinstance(item, Field):
      if not item.check.ok(value):
        raise ConfigError(f"config.{dotted} = {value!r} is not allowed: {item.check.allowed}")
    elif not isinstance(value, ml_collections.ConfigDict):
      raise ConfigError(f"config.{dotted} = {value!r} is not allowed: a block of fields")
    else:
      validate(value, item, root=root, prefix=dotted + ".")


def describe(schema: Schema, config: ml_collections.ConfigDict | None = None) -> str:
  """Every field with its value (the config's, or the default) and meaning, one per line."""
  rows = []
  for dotted, item in walk(schema):
    value = item.default
    if config is not None:
      value = config
      for part in dotted.split("."):
        value = value[part]
      if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    rows.append((dotted, repr(value), item.meaning))
  width = max(len(r[0]) for r in rows)
  vwidth = min(max(len(r[1]) for r in rows), 28)
  return "\n".join(f"{n:<{width}}  {v:<{vwidth}}  {m}" for n, v, m in rows)
