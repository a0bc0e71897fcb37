"""``quantize(model, rules)``: quantize an existing Linen model without editing its code.

Every ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``, ``nn.Einsum`` and ``nn.Embed`` (lookup and
``attend``) the model calls is intercepted, also inside ``nn.scan``, ``nn.remat`` and ``nn.vmap``;
the first rule whose regex fully matches the layer's module path (``/``-joined, relative to the
model, e.g. ``"Block_0/Dense_1"``; the layers of a scanned stack share one path) decides its
weight and input formats. Layers no rule matches, and layers whose rule has neither format, stay
in float. A quantizing rule that meets a module it cannot quantize (a custom op, another kind of
layer that owns a weight) warns with the module's path.

Example:
  >>> rules = [
  ...   QuantRule.keep_float("Conv_0|Dense_1"),  # first and last layer in float
  ...   QuantRule(".*", weight=QuantSpec.for_weights(4), input=QuantSpec.for_activations(4)),
  ... ]
  >>> qmodel = quantize(MyCNN(), rules)
  >>> variables = qmodel.init(jax.random.key(0), images)   # MyCNN's params + quantization params
  >>> logits = qmodel.apply(variables, images)
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efqat_jax.nn import layer_table
from efqat_jax.nn.layers import QuantConv, QuantDense, QuantDenseGeneral
from efqat_jax.nn.ops import Mode
from efqat_jax.nn.rewrite import (
  METHODS,
  OP_FIELDS,
  call_quantized,
  is_quantized,
  quantizable_method,
  why_not_rewritable,
)
from efqat_jax.quant.spec import QuantSpec

_QUANT_LAYERS = (QuantDense, QuantDenseGeneral, QuantConv)
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


class QuantizedModel(nn.Module):
  """A Linen model whose Dense/DenseGeneral/Conv layers are quantized by rules.

  It shares its scope with ``model``, so its params are the model's params plus the
  quantization params, at the same paths. Switch behaviour with ``clone(mode=...)``.

  Attributes:
    model: the float Linen model (any module; only its ``__call__`` is wrapped).
    rules: the rules, first match wins.
    mode: see ``Mode``.
    weight_estimator: kernel range estimator of Mode.CALIBRATE, ``"minmax"`` or ``"mse"``.
  """

  model: nn.Module
  rules: tuple[QuantRule, ...]
  mode: Mode = Mode.QUANTIZE
  weight_estimator: str = "minmax"

  def setup(self):
    nn.share_scope(self, self.model)

  def __call__(self, *args, **kwargs):
    root = len(self.scope.path)
    matched: set[int] = set()
    seen: list[str] = []
    initializing = self.is_initializing()

    def interceptor(next_fun, call_args, call_kwargs, context):
      module, method = context.module, context.method_name
      path = "/".join(module.scope.path[root:])
      if is_quantized(module) or isinstance(module, _QUANT_LAYERS) or module is self:
        return next_fun(*call_args, **call_kwargs)
      if not quantizable_method(module, method):
        out = next_fun(*call_args, **call_kwargs)
        if initializing and method == "__call__":
          self._warn_if_unquantized_weights(module, path)
        return out
      seen.append(path)
      rule = self._rule_for(path)
      if rule is None:
        return next_fun(*call_args, **call_kwargs)
      matched.add(self.rules.index(rule))
      if rule.weight is None and rule.input is None:
        return next_fun(*call_args, **call_kwargs)
      reason = why_not_rewritable(module, method)
      if reason is not None:
        if initializing:
          warnings.warn(f"efqat_jax.quantize: {path} stays in float: {reason}", stacklevel=2)
        return next_fun(*call_args, **call_kwargs)
      fields = dict(
        weight_spec=rule.weight,
        input_spec=rule.input,
        mode=self.mode,
        weight_estimator=self.weight_estimator,
      )
      return call_quantized(module, method, fields, *call_args, **call_kwargs)

    with layer_table.recording() as reported, nn.intercept_methods(interceptor):
      out = self.model(*args, **kwargs)
    if initializing:
      prefix = len("/".join(self.scope.path)) + 1 if root else 0
      stacked = [p[prefix:] for p, layer in reported.items() if self._is_stacked(p[prefix:], layer)]
      self._check_all_rules_matched(matched, list(dict.fromkeys(seen)), stacked)
    return out

  def _is_stacked(self, path: str, layer: layer_table.QuantizedLayer) -> bool:
    weight = layer_table.params_at(self.variables["params"], path)[layer.weight_name]
    return jnp.ndim(weight) > len(layer.weight_shape)

  def _rule_for(self, path: str) -> QuantRule | None:
    return next((rule for rule in self.rules if rule.matches(path)), None)

  def _warn_if_unquantized_weights(self, module: nn.Module, path: str) -> None:
    """Warns when a quantizing rule matches a module of another kind that owns a weight
    (a param of two or more axes named like one: kernel, weight, w, embedding): it stays in
    float, and the user should know."""
    rule = self._rule_for(path)
    if rule is None or (rule.weight is None and rule.input is None):
      return
    own = module.variables.get("params", {})
    weights = sorted(
      k
      for k, v in own.items()
      if not isinstance(v, Mapping) and jnp.ndim(v) >= 2 and _WEIGHT_NAME.search(k)
    )
    if weights:
      warnings.warn(
        f"efqat_jax.quantize: {path or type(module).__name__} ({type(module).__name__}) stays in"
        f" float: its weights {weights} belong to no quantizable layer kind"
        " (Dense, DenseGeneral, Conv, Einsum, Embed)",
        stacklevel=3,
      )

  def _check_all_rules_matched(self, matched: set[int], paths: list[str], stacked: list[str]):
    """Raises for a rule that matched no layer, saying why when it names a layer of a stack."""
    for i, rule in enumerate(self.rules):
      if i in matched:
        continue
      stack = next((p for p in stacked if _addresses_stack_member(rule, p)), None)
      if stack is not None:
        raise ValueError(
          f"QuantRule.module_path {rule.module_path!r} addresses one layer of {stack!r}, whose"
          " layers are stacked by nn.scan/nn.vmap: the stack runs one program, so all its layers"
          f" share one format. Give the whole stack one rule ({stack!r}), or build those"
          " layers unstacked (a Python loop) to give them different formats"
        )
      raise ValueError(
        f"QuantRule.module_path {rule.module_path!r} matched no Dense/DenseGeneral/Conv/Einsum/"
        f"Embed layer of {type(self.model).__name__}; its layers are {paths}"
      )


def _addresses_stack_member(rule: QuantRule, path: str) -> bool:
  """Whether ``rule`` names one layer of ``path`` as ``path[i]`` or ``<stack>_i/...``."""
  head, _, tail = path.rpartition("/")
  candidates = [f"{path}[{i}]" for i in range(64)]
  if head:
    candidates += [f"{head}_{i}/{tail}" for i in range(64)]
    candidates += [f"{head}/{i}/{tail}" for i in range(64)]
  return any(rule.matches(c) for c in candidates)


def quantize(
  model: nn.Module,
  rules: Sequence[QuantRule] | QuantRule,
  mode: Mode = Mode.QUANTIZE,
  weight_estimator: str = "minmax",
) -> QuantizedModel:
  """Wraps ``model`` so that its layers are quantized according to ``rules``.

  Args:
    model: a Flax Linen module written with plain ``nn.Dense``/``nn.DenseGeneral``/``nn.Conv``.
    rules: one rule or a sequence of rules; the first rule matching a layer's path applies.
    mode: initial behaviour (``Mode.QUANTIZE`` by default).
    weight_estimator: kernel range estimator of Mode.CALIBRATE, ``"minmax"`` or ``"mse"``.

  Returns:
    A QuantizedModel that initialises and applies like ``model``. At init, a rule that matches
    no layer raises ValueError.
  """
  if not isinstance(model, nn.Module):
    raise TypeError(f"quantize takes a flax.linen.Module; got {_kind(model)}")
  rules = (rules,) if isinstance(rules, QuantRule) else tuple(rules)
  for rule in rules:
    if not isinstance(rule, QuantRule):
      raise ValueError(f"rules must be QuantRule objects, got {type(rule).__name__}: {rule!r}")
  return QuantizedModel(model=model, rules=rules, mode=mode, weight_estimator=weight_estimator)


def _kind(model: Any) -> str:
  """What ``model`` is, for the error that says quantize does not take it."""
  name = f"{type(model).__module__}.{type(model).__qualname__}"
  if any(c.__module__.startswith("flax.nnx") for c in type(model).__mro__):
    return f"the Flax NNX module {name}, and NNX modules are not supported yet"
  if isinstance(model, type) and issubclass(model, nn.Module):
    return f"the class {model.__qualname__}: pass an instance, e.g. {model.__qualname__}(...)"
  return name


def quantizable_paths(model: nn.Module, *args, **kwargs) -> dict[str, str]:
  """The quantizable layers ``model`` calls (see ``rewrite``), in call order: ``{path: kind}``
  with kind the Flax class name it is (``"Dense"``, ``"Conv"``, ``"Einsum"``, ``"Embed"``, ...).

  Traces ``model.init`` abstractly (``jax.eval_shape``): nothing is computed.
  """
  paths: dict[str, str] = {}

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if quantizable_method(module, context.method_name):
      kind = next(c for c in (*OP_FIELDS, *METHODS) if isinstance(module, c))
      paths.setdefault("/".join(module.scope.path), kind.__name__)
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  return paths
