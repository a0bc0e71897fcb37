"""``QuantRule``: which layers get which formats, by a regex on the module path; shared by the
Linen and NNX front ends of ``quantize``."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from efqat_jax.quant.spec import QuantSpec

_WEIGHT_NAME = re.compile(r"kernel|weight|embedding|^w$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class QuantRule:
  """Formats for the layers whose module path fully matches ``module_path`` (a regex).

  Attributes:
    module_path: regular expression, matched with ``re.fullmatch`` against the path.
    weight: kernel format, or None for a float kernel.
    input: input-activation format, or None for float inputs.
  """

  module_path: str
  weight: QuantSpec | None
  input: QuantSpec | None

  def __post_init__(self):
    try:
      re.compile(self.module_path)
    except re.error as e:
      raise ValueError(
        f"QuantRule.module_path {self.module_path!r} is not a valid regex: {e}"
      ) from e

  @classmethod
  def keep_float(cls, module_path: str) -> QuantRule:
    """A rule that leaves the matching layers in float."""
    return cls(module_path, weight=None, input=None)

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.module_path, path) is not None

  @property
  def quantizes(self) -> bool:
    return self.weight is not None or self.input is not None


def as_rules(rules: Sequence[QuantRule] | QuantRule) -> tuple[QuantRule, ...]:
  """``rules`` as a tuple, each checked to be a QuantRule."""
  rules = (rules,) if isinstance(rules, QuantRule) else tuple(rules)
  for rule in rules:
    if not isinstance(rule, QuantRule):
      raise ValueError(f"rules must be QuantRule objects, got {type(rule).__name__}: {rule!r}")
  return rules


def first_rule(rules: Sequence[QuantRule], path: str) -> QuantRule | None:
  """The first rule that matches ``path``, or None."""
  return next((rule for rule in rules if rule.matches(path)), None)


def looks_like_weight(name: str, value: Any) -> bool:
  """A param of two or more axes named like a weight (kernel, weight, w, embedding)."""
  return jnp.ndim(value) >= 2 and _WEIGHT_NAME.search(name) is not None


def addresses_stack_member(rule: QuantRule, path: str) -> bool:
  """Whether ``rule`` names one layer of the stack at ``path`` as ``path[i]``, ``<stack>_i/...``
  or ``<stack>/i/...``."""
  head, _, tail = path.rpartition("/")
  candidates = [f"{path}[{i}]" for i in range(64)]
  if head:
    candidates += [f"{head}_{i}/{tail}" for i in range(64)]
    candidates += [f"{head}/{i}/{tail}" for i in range(64)]
  return any(rule.matches(c) for c in candidates)


def check_all_rules_matched(
  rules: Sequence[QuantRule],
  matched: set[int],
  paths: list[str],
  stacked: list[str],
  model_name: str,
  kinds: str,
  transforms: str,
) -> None:
  """Raises for a rule that matched no layer, saying why when it names one layer of a stack.

  Args:
    rules: the rules; ``matched``: the indices of those that matched a layer.
    paths: the quantizable layers' paths; ``stacked``: those of stacked layers.
    model_name: the model's class name; ``kinds``: the layer kinds the front end quantizes;
    transforms: the transforms that stack layers, for the error.
  """
  for i, rule in enumerate(rules):
    if i in matched:
      continue
    stack = next((p for p in stacked if addresses_stack_member(rule, p)), None)
    if stack is not None:
      raise ValueError(
        f"QuantRule.module_path {rule.module_path!r} addresses one layer of {stack!r}, whose"
        f" layers are stacked by {transforms}: the stack runs one program, so all its layers"
        f" share one format. Give the whole stack one rule ({stack!r}), or build those"
        " layers unstacked (a Python loop) to give them different formats"
      )
    raise ValueError(
      f"QuantRule.module_path {rule.module_path!r} matched no {kinds} layer of {model_name};"
      f" its layers are {paths}"
    )


def warn_unquantized_weights(path: str, kind: str, weights: list[str], kinds: str) -> None:
  """Warns that the module at ``path`` (of class ``kind``), which a quantizing rule matches,
  stays in float although it owns ``weights`` (if any)."""
  if weights:
    warnings.warn(
      f"efqat_jax.quantize: {path or kind} ({kind}) stays in float: its weights {weights} belong"
      f" to no quantizable layer kind ({kinds})",
      stacklevel=5,
    )
