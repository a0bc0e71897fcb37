"""``quantize(model, rules)``: quantize an existing Linen model without editing its code (an NNX
model goes to ``efqat_jax.nn.nnx_quantize``).

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

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from efqat_jax.nn import layer_table
from efqat_jax.nn.direct_matmuls import warn_direct_matmuls
from efqat_jax.nn.layers import QuantConv, QuantDense, QuantDenseGeneral
from efqat_jax.nn.nnx_linen import as_linen
from efqat_jax.nn.nnx_quantize import nnx_quantizable_paths, quantize_nnx
from efqat_jax.nn.ops import WEIGHT_ESTIMATORS, Mode
from efqat_jax.nn.rewrite import (
  METHODS,
  OP_FIELDS,
  call_quantized,
  is_quantized,
  quantizable_method,
  why_not_rewritable,
)
from efqat_jax.nn.rule import (
  QuantRule,
  as_rules,
  check_all_rules_matched,
  first_rule,
  looks_like_weight,
  warn_unquantized_weights,
)

_QUANT_LAYERS = (QuantDense, QuantDenseGeneral, QuantConv)
LINEN_KINDS = "Dense, DenseGeneral, Conv, Einsum, Embed"


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
      if not rule.quantizes:
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
    return first_rule(self.rules, path)

  def _warn_if_unquantized_weights(self, module: nn.Module, path: str) -> None:
    """Warns when a quantizing rule matches a module of another kind that owns a weight
    (a param of two or more axes named like one: kernel, weight, w, embedding): it stays in
    float, and the user should know."""
    rule = self._rule_for(path)
    if rule is None or not rule.quantizes:
      return
    own = module.variables.get("params", {})
    weights = sorted(
      k for k, v in own.items() if not isinstance(v, Mapping) and looks_like_weight(k, v)
    )
    warn_unquantized_weights(path, type(module).__name__, weights, LINEN_KINDS)

  def _check_all_rules_matched(self, matched: set[int], paths: list[str], stacked: list[str]):
    name = type(self.model).__name__
    check_all_rules_matched(
      self.rules, matched, paths, stacked, name, LINEN_KINDS, "nn.scan/nn.vmap"
    )


def quantize(
  model: nn.Module | nnx.Module,
  rules: Sequence[QuantRule] | QuantRule,
  *example_args: Any,
  mode: Mode = Mode.QUANTIZE,
  weight_estimator: str = "minmax",
  **example_kwargs: Any,
) -> QuantizedModel | nnx.Module:
  """Quantizes the layers of ``model`` according to ``rules``, without editing its code.

  Args:
    model: a Flax Linen module, or a Flax NNX module (see ``efqat_jax.nn.nnx_quantize``).
    rules: one rule or a sequence of rules; the first rule matching a layer's path applies.
    *example_args: NNX only: the positional inputs of one call of the model (its values set the
      initial input scales, as the batch given to ``init`` does for Linen).
    mode: initial behaviour (``Mode.QUANTIZE`` by default).
    weight_estimator: kernel range estimator of Mode.CALIBRATE, ``"minmax"`` or ``"mse"``.
    **example_kwargs: NNX only: the keyword inputs of that call (e.g. ``train=False``).

  Returns:
    Linen: a QuantizedModel that initialises and applies like ``model``; at init, a rule that
    matches no layer raises ValueError. NNX: a quantized copy of ``model`` (``model`` is left
    as it was), with its quantization params as ``nnx.Param``s next to each weight.
  """
  rules = as_rules(rules)
  if not isinstance(mode, Mode):
    raise ValueError(f"mode must be a Mode, one of {[m.name for m in Mode]}; got {mode!r}")
  if weight_estimator not in WEIGHT_ESTIMATORS:
    raise ValueError(
      f"weight_estimator must be one of {tuple(WEIGHT_ESTIMATORS)}, got {weight_estimator!r}"
    )
  if isinstance(model, nnx.Module):
    if not example_args and not example_kwargs:
      raise ValueError(
        "quantize: an NNX model needs the inputs of one call, e.g. quantize(model, rules, x)"
        " (their values set the initial input scales)"
      )
    qmodel = quantize_nnx(model, rules, example_args, example_kwargs, mode, weight_estimator)
    module, variables = as_linen(qmodel)
    layers = lambda: nnx_quantizable_paths(qmodel)
    warn_direct_matmuls(module, variables, example_args, example_kwargs, layers)
    return qmodel
  if not isinstance(model, nn.Module):
    raise TypeError(
      f"quantize takes a flax.linen.Module or a flax.nnx.Module instance; got {_kind(model)}"
    )
  if example_args or example_kwargs:
    raise ValueError(
      "quantize: a Linen model takes its inputs at init, not here: qmodel.init(key, *inputs);"
      f" got {len(example_args)} positional and keyword inputs {sorted(example_kwargs)}"
    )
  return QuantizedModel(model=model, rules=rules, mode=mode, weight_estimator=weight_estimator)


def _kind(model: Any) -> str:
  """What ``model`` is, for the error that says quantize does not take it."""
  if isinstance(model, type) and issubclass(model, nn.Module | nnx.Module):
    return f"the class {model.__name__}: pass an instance, e.g. {model.__name__}(...)"
  return f"{type(model).__module__}.{type(model).__qualname__}"


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
