"""``quantize(model, rules)``: quantize an existing Linen model without editing its code.

Every ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Conv`` the model calls is intercepted; the first
rule whose regex fully matches the layer's module path (``/``-joined, relative to the model,
e.g. ``"Block_0/Dense_1"``) decides its weight and input formats. Layers no rule matches, and
layers whose rule has neither format, stay in float.

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
from collections.abc import Sequence

import flax.linen as nn
import jax

from efqat_jax.nn.layers import QuantConv, QuantDense, QuantDenseGeneral
from efqat_jax.nn.ops import Mode, call_quantized, is_quantized, op_field
from efqat_jax.quant.spec import QuantSpec

_QUANT_LAYERS = (QuantDense, QuantDenseGeneral, QuantConv)


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

    def interceptor(next_fun, call_args, call_kwargs, context):
      module = context.module
      if (
        context.method_name != "__call__"
        or op_field(module) is None
        or is_quantized(module)
        or isinstance(module, _QUANT_LAYERS)
      ):
        return next_fun(*call_args, **call_kwargs)
      path = "/".join(module.scope.path[root:])
      rule = self._rule_for(path)
      if rule is None:
        return next_fun(*call_args, **call_kwargs)
      matched.add(self.rules.index(rule))
      if rule.weight is None and rule.input is None:
        return next_fun(*call_args, **call_kwargs)
      fields = dict(
        weight_spec=rule.weight,
        input_spec=rule.input,
        mode=self.mode,
        weight_estimator=self.weight_estimator,
      )
      return call_quantized(module, type(module), fields, *call_args, **call_kwargs)

    with nn.intercept_methods(interceptor):
      out = self.model(*args, **kwargs)
    if self.is_initializing():
      unmatched = [r.module_path for i, r in enumerate(self.rules) if i not in matched]
      if unmatched:
        raise ValueError(
          f"QuantRule.module_path {unmatched} matched no Dense/DenseGeneral/Conv layer of"
          f" {type(self.model).__name__}; paths look like 'Block_0/Dense_1'"
        )
    return out

  def _rule_for(self, path: str) -> QuantRule | None:
    return next((rule for rule in self.rules if rule.matches(path)), None)


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
  rules = (rules,) if isinstance(rules, QuantRule) else tuple(rules)
  for rule in rules:
    if not isinstance(rule, QuantRule):
      raise ValueError(f"rules must be QuantRule objects, got {type(rule).__name__}: {rule!r}")
  return QuantizedModel(model=model, rules=rules, mode=mode, weight_estimator=weight_estimator)


def quantizable_paths(model: nn.Module, *args, **kwargs) -> list[str]:
  """Module paths of the Dense/DenseGeneral/Conv layers ``model`` calls, in call order.

  Traces ``model.init`` abstractly (``jax.eval_shape``): nothing is computed.
  """
  paths: list[str] = []

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name == "__call__" and op_field(module) is not None:
      paths.append("/".join(module.scope.path))
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  return list(dict.fromkeys(paths))
