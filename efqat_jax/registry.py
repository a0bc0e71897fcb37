"""A registry of named components (stages, PTQ methods, QAT variants): adding one is one call."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

from efqat_jax.errors import ConfigError

T = TypeVar("T")


def nearest(name: str, names: list[str] | tuple[str, ...]) -> str:
  """`` (did you mean 'x'?)`` for the closest of ``names``, or ``""`` if none is close."""
  close = difflib.get_close_matches(name, list(names), n=2, cutoff=0.6)
  return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


class Registry(Generic[T]):
  """Components by name, in registration order.

  Example:
    >>> PTQ_METHODS = Registry("ptq.method")
    >>> PTQ_METHODS.register("rtn", round_to_nearest)
    >>> PTQ_METHODS.get("rtn")
  """

  def __init__(self, field: str):
    self.field = field  # the config field that picks a component (named in errors)
    self._items: dict[str, T] = {}

  def register(self, name: str, item: T) -> T:
    if name in self._items:
      raise ValueError(f"{self.field}: {name!r} is registered twice")
    self._items[name] = item
    return item

  def get(self, name: str) -> T:
    """The component ``name``; a ConfigError naming the field and the allowed names if unknown."""
    if name not in self._items:
      raise ConfigError(
        f"config.{self.field} = {name!r} is not allowed: one of {list(self._items)}"
        + nearest(str(name), tuple(self._items))
      )
    return self._items[name]

  def names(self) -> tuple[str, ...]:
    return tuple(self._items)

  def __contains__(self, name: object) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(self._items)

  def items(self):
    return self._items.items()
