"""``quantize(model, rules, *example_inputs)`` for Flax NNX models, without editing their code.

The NNX front end of the same quantized ops as the Linen one (``efqat_jax.nn.ops``): every
``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.Einsum`` and ``nnx.Embed`` (lookup and
``attend``) of a copy of the model computes with ``QuantizedOps``, also inside ``nnx.scan``,
``nnx.vmap`` and ``nnx.remat``. Rules match the module paths that ``nnx.state`` shows
(``/``-joined, e.g. ``"blocks/attn/query"``; the layers of a stack built with ``nnx.vmap`` share
one path), first match wins, as for Linen.

How, in NNX terms:
  - each quantized layer's class is swapped for a subclass of it whose methods run the
    original ones with the layer's ``QuantizedOps`` current; the layer's op field
    (``dot_general``, ``conv_general_dilated``, ``einsum_op``) calls that. The layer's formats
    are a static attribute (``efqat_quant``), so they survive ``nnx.split`` / ``nnx.merge``
    and every lifted transform;
  - quantization params are ``nnx.Param``s on the layer, next to its weight, with the names of
    the Linen front end (``kernel_scale``, ``input_scale``, ``input_zero_point``;
    ``embedding_scale``), stacked like the weight in a stack. NNX cannot create variables inside
    a transform, so ``quantize`` runs the model twice on the example inputs: abstractly, to learn
    the params' shapes; then for real, with the params created, to give them the values Linen's
    ``init`` gives (min-max of the weight and of the example batch). The model's other state
    (batch statistics, RNG counts) is left as it was.

Example:
  >>> rules = [QuantRule(".*", weight=QuantSpec.for_weights(4), input=QuantSpec.for_activations(8))]
  >>> qmodel = quantize(MyNnxCNN(rngs=nnx.Rngs(0)), rules, images)
  >>> logits = qmodel(images)                        # fake-quantized
  >>> nnx.state(qmodel, nnx.Param)["conv1"]["kernel_scale"]
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from efqat_jax.nn import layer_table
from efqat_jax.nn.ops import QUANT_PARAM_NAMES, Mode, QuantizedOps
from efqat_jax.nn.rule import (
  QuantRule,
  check_all_rules_matched,
  first_rule,
  looks_like_weight,
  warn_unquantized_weights,
)
from efqat_jax.quant.spec import QuantSpec

# Layer kinds with their op field (None: the methods are re-run on the quantized table).
OP_FIELDS = {
  nnx.Linear: "dot_general",
  nnx.LinearGeneral: "dot_general",
  nnx.Conv: "conv_general_dilated",
  nnx.Einsum: "einsum_op",
  nnx.Embed: None,
}
_FLOAT_OPS = {
  "dot_general": (lax.dot_general,),
  "conv_general_dilated": (lax.conv_general_dilated,),
  "einsum_op": (jnp.einsum,),
}
QUANT_ATTRIBUTE = "efqat_quant"
NNX_KINDS = "Linear, LinearGeneral, Conv, Einsum, Embed"
NNX_MODES = (Mode.QUANTIZE, Mode.FLOAT)  # calibration and the integer path: Linen only so far


@dataclasses.dataclass(frozen=True)
class LayerQuant:
  """What one quantized NNX layer computes (a static, hashable attribute of the layer).

  Attributes:
    path: the layer's module path, ``/``-joined.
    weight: the weight's format, or None for a float weight.
    input: the input format, or None for float inputs.
    mode: see ``Mode``.
    weight_estimator: the weight range estimator of Mode.CALIBRATE.
  """

  path: str
  weight: QuantSpec | None
  input: QuantSpec | None
  mode: Mode = Mode.QUANTIZE
  weight_estimator: str = "minmax"


class _LayerScope:
  """The part of a Linen ``Scope`` that ``QuantizedOps`` uses, over one NNX layer's Variables.

  With ``initializing`` (inside ``quantize``) a quantization param is computed from its
  initialiser on each use, as Linen's ``init`` does: written over the Variable where it exists,
  recorded in ``created`` (its shape) where it does not yet (the abstract first run).
  """

  def __init__(self, layer: nnx.Module, initializing: bool, created: dict | None):
    self.layer, self.initializing, self.created = layer, initializing, created
    self.path = tuple(getattr(layer, QUANT_ATTRIBUTE).path.split("/"))

  def _variable(self, name: str) -> nnx.Variable | None:
    value = vars(self.layer).get(name)
    return value if isinstance(value, nnx.Variable) else None

  def get_flag(self, name: str, default: Any = None) -> Any:
    return self.initializing if name == "initializing" else default

  def is_mutable_collection(self, collection: str) -> bool:
    del collection
    return True

  def has_variable(self, collection: str, name: str) -> bool:
    del collection
    if self.initializing and name in QUANT_PARAM_NAMES:
      return False
    return self._variable(name) is not None

  def get_variable(self, collection: str, name: str, default: Any = None) -> Any:
    del collection
    variable = self._variable(name)
    return default if variable is None else variable[...]

  def put_variable(self, collection: str, name: str, value: Any) -> None:
    del collection
    variable = self._variable(name)
    if variable is None:
      raise ValueError(
        f"{'/'.join(self.path)}: writing {name!r} is not supported on NNX models yet (calibration,"
        " input capture and the integer path are Linen-only so far)"
      )
    variable[...] = value

  def variable(self, collection: str, name: str, init: Callable[[], Any]):
    value = init()
    if self._variable(name) is not None:
      self.put_variable(collection, name, value)
    elif self.created is not None:
      self.created[(self.path, name)] = jax.ShapeDtypeStruct(
        jnp.shape(value), jnp.result_type(value)
      )
    return _Value(value)

  def variables(self) -> dict[str, dict[str, Any]]:
    params = {k: v[...] for k, v in vars(self.layer).items() if isinstance(v, nnx.Param)}
    return {"params": params}


@dataclasses.dataclass(frozen=True)
class _Value:
  value: Any


# The quantized layer whose method runs now: (its QuantizedOps, the op field's float op).
_CURRENT: contextvars.ContextVar[QuantizedOps | None] = contextvars.ContextVar(
  "efqat_jax_nnx_layer", default=None
)
# How ``quantize`` is initialising, while it is: (initializing, created shapes).
_INIT: contextvars.ContextVar[tuple[bool, dict | None]] = contextvars.ContextVar(
  "efqat_jax_nnx_init", default=(False, None)
)


@contextlib.contextmanager
def _running(layer: nnx.Module, weight_name: str) -> Iterator[QuantizedOps]:
  quant: LayerQuant = getattr(layer, QUANT_ATTRIBUTE)
  initializing, created = _INIT.get()
  ops = QuantizedOps(
    scope=_LayerScope(layer, initializing, created),  # type: ignore[arg-type]
    weight_spec=quant.weight,
    input_spec=quant.input,
    mode=quant.mode,
    weight_estimator=quant.weight_estimator,
    weight_name=weight_name,
  )
  token = _CURRENT.set(ops)
  try:
    yield ops
  finally:
    _CURRENT.reset(token)


def _current_ops(op_name: str) -> QuantizedOps:
  ops = _CURRENT.get()
  if ops is None:
    raise ValueError(f"efqat_jax's quantized {op_name} was called outside its quantized layer")
  return ops


def _no_sharding(out_sharding: Any, path: str) -> None:
  if out_sharding is not None:
    raise ValueError(
      f"{path}: out_sharding is not supported on a quantized layer (got {out_sharding})"
    )


def _dot_general(
  lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None
) -> jax.Array:
  ops = _current_ops("dot_general")
  _no_sharding(out_sharding, ops.path)
  return ops.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)


def _conv_general_dilated(lhs, rhs, *args, out_sharding=None, **kwargs) -> jax.Array:
  ops = _current_ops("conv_general_dilated")
  _no_sharding(out_sharding, ops.path)
  return ops.conv_general_dilated(lhs, rhs, *args, **kwargs)


def _einsum(
  equation, lhs, rhs, precision=None, preferred_element_type=None, out_sharding=None
) -> jax.Array:
  ops = _current_ops("einsum")
  _no_sharding(out_sharding, ops.path)
  return ops.einsum(equation.replace(" ", ""), lhs, rhs, precision, preferred_element_type)


_QUANTIZED_OPS = {
  "dot_general": _dot_general,
  "conv_general_dilated": _conv_general_dilated,
  "einsum_op": _einsum,
}


@functools.cache
def quantized_class(cls: type[nnx.Module]) -> type[nnx.Module]:
  """The subclass of the NNX layer class ``cls`` that a quantized layer of it becomes."""
  base = next(kind for kind in OP_FIELDS if issubclass(cls, kind))
  if base is nnx.Embed:
    methods = {"__call__": _embed_lookup, "attend": _embed_attend}
  else:
    methods = {"__call__": _with_ops(cls.__call__, OP_FIELDS[base])}
  return type(cls.__name__, (cls,), {**methods, "__module__": cls.__module__, "_float_class": cls})


def _with_ops(call: Callable, field: str) -> Callable:
  """``call`` run with the layer's QuantizedOps current, for the op in ``field`` to use."""

  @functools.wraps(call)
  def method(self, *args, **kwargs):
    with _running(self, "kernel") as ops:
      out = call(self, *args, **kwargs)
    if not ops.calls:
      raise ValueError(
        f"cannot quantize {ops.path}: {type(self).__name__}.__call__ never called its {field},"
        " so it would silently stay in float"
      )
    return out

  return method


def _embed_lookup(self, inputs, out_sharding=None):
  """``nnx.Embed.__call__`` with the table quantized per row (the ids are not quantized)."""
  if not jnp.issubdtype(inputs.dtype, jnp.integer):
    raise ValueError("Input type must be an integer or unsigned integer.")
  with _running(self, "embedding") as ops:
    _no_sharding(out_sharding, ops.path)
    (table,) = self.promote_dtype((self.embedding[...],), dtype=self.dtype, inexact=False)
    return ops.take(table, inputs)


def _embed_attend(self, query, out_sharding=None):
  """``nnx.Embed.attend`` (the tied output projection) with the table quantized per row."""
  with _running(self, "embedding") as ops:
    _no_sharding(out_sharding, ops.path)
    query, table = self.promote_dtype((query, self.embedding[...]), dtype=self.dtype)
    return ops.dot_general(query, table, (((query.ndim - 1,), (1,)), ((), ())))


def _why_not_quantizable(layer: nnx.Module) -> str | None:
  """Why ``layer`` (of a quantizable kind) cannot run quantized, or None if it can."""
  base = next(kind for kind in OP_FIELDS if isinstance(layer, kind))
  methods = ("__call__", "attend") if base is nnx.Embed else ("__call__",)
  for name in methods:
    if getattr(type(layer), name) is not getattr(base, name):
      return f"{type(layer).__name__} overrides {base.__name__}.{name}"
  field = OP_FIELDS[base]
  if field is not None:
    op = getattr(layer, field, None)
    if op is not None and not any(op is f for f in _FLOAT_OPS[field]):
      return f"it already sets a custom {field}"
    if getattr(layer, f"{field}_cls", None) is not None:
      return f"it already sets a custom {field}_cls"
  return None


def _path(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def quantize_nnx(
  model: nnx.Module,
  rules: Sequence[QuantRule],
  example_args: tuple,
  example_kwargs: dict,
  mode: Mode = Mode.QUANTIZE,
  weight_estimator: str = "minmax",
) -> nnx.Module:
  """A quantized copy of the NNX ``model`` (see the module docstring); ``quantize`` calls it.

  Args:
    model: the float NNX model; it is not modified.
    rules: the rules, first match wins.
    example_args: positional inputs of one call of the model (values are read: the input
      scales start from their min-max, as in Linen's ``init``).
    example_kwargs: keyword inputs of that call (e.g. ``train=False``).
    mode: the behaviour of the quantized copy.
    weight_estimator: kernel range estimator of Mode.CALIBRATE, ``"minmax"`` or ``"mse"``.

  Raises:
    ValueError: a rule that matches no quantizable layer (or addresses one layer of a stack).
  """
  _check_mode(mode)
  qmodel = nnx.clone(model)
  before = nnx.as_pure(nnx.state(qmodel))  # values, not the Variables themselves
  layers, matched, seen = {}, set(), []
  for path, module in nnx.iter_modules(qmodel):
    name = _path(path)
    if not any(isinstance(module, kind) for kind in OP_FIELDS):
      _warn_if_unquantized_weights(module, name, rules)
      continue
    seen.append(name)
    rule = first_rule(rules, name)
    if rule is None:
      continue
    matched.add(rules.index(rule))
    if not rule.quantizes:
      continue
    reason = _why_not_quantizable(module)
    if reason is not None:
      warnings.warn(f"efqat_jax.quantize: {name} stays in float: {reason}", stacklevel=3)
      continue
    module.__class__ = quantized_class(type(module))
    setattr(
      module, QUANT_ATTRIBUTE, LayerQuant(name, rule.weight, rule.input, mode, weight_estimator)
    )
    field = OP_FIELDS[next(kind for kind in OP_FIELDS if isinstance(module, kind))]
    if field is not None:
      setattr(module, field, _QUANTIZED_OPS[field])
    layers[name] = module
  stacked = _create_quant_params(qmodel, layers, example_args, example_kwargs)
  check_all_rules_matched(
    rules, matched, seen, stacked, type(model).__name__, NNX_KINDS, "nnx.vmap"
  )
  nnx.update(qmodel, before)  # the example call's side effects (batch stats, RNG counts) undone
  return qmodel


def _check_mode(mode: Mode) -> None:
  if mode not in NNX_MODES:
    raise ValueError(
      f"mode must be one of {[m.name for m in NNX_MODES]} for an NNX model, got {mode.name}:"
      " calibration and the integer path are Linen-only so far"
    )


def _create_quant_params(qmodel, layers: dict, args: tuple, kwargs: dict) -> list[str]:
  """Creates every quantized layer's quantization params with their initial values; returns
  the paths of the stacked layers."""
  created: dict = {}
  with layer_table.recording() as reported, _initializing(created):
    nnx.eval_shape(lambda m: m(*args, **kwargs), qmodel)
  for (path, name), shape in created.items():
    key = "/".join(path)
    stack = _stack_shape(layers[key], reported[key])
    setattr(layers[key], name, nnx.Param(jnp.zeros((*stack, *shape.shape), shape.dtype)))
  with _initializing(None):
    qmodel(*args, **kwargs)
  return [path for path, layer in reported.items() if _stack_shape(layers[path], layer)]


def _stack_shape(module: nnx.Module, layer: layer_table.QuantizedLayer) -> tuple[int, ...]:
  """The leading axes that ``nnx.vmap`` stacked onto ``module``'s weight."""
  weight = getattr(module, layer.weight_name)[...]
  return weight.shape[: weight.ndim - len(layer.weight_shape)]


@contextlib.contextmanager
def _initializing(created: dict | None) -> Iterator[None]:
  token = _INIT.set((True, created))
  try:
    yield
  finally:
    _INIT.reset(token)


def _warn_if_unquantized_weights(module: nnx.Module, path: str, rules) -> None:
  """Warns when a quantizing rule matches a module of another kind that owns a weight."""
  rule = first_rule(rules, path)
  if rule is None or not rule.quantizes:
    return
  weights = sorted(
    k for k, v in vars(module).items() if isinstance(v, nnx.Param) and looks_like_weight(k, v[...])
  )
  warn_unquantized_weights(path, type(module).__name__, weights, NNX_KINDS)


def with_mode(model: nnx.Module, mode: Mode) -> nnx.Module:
  """A copy of the quantized NNX ``model`` (sharing its arrays) with every quantized layer in
  ``mode`` (``Mode.QUANTIZE`` or ``Mode.FLOAT`` so far)."""
  _check_mode(mode)
  copy = nnx.clone(model)
  found = False
  for _, module in nnx.iter_modules(copy):
    quant = vars(module).get(QUANT_ATTRIBUTE)
    if isinstance(quant, LayerQuant):
      setattr(module, QUANT_ATTRIBUTE, dataclasses.replace(quant, mode=mode))
      found = True
  if not found:
    raise ValueError(f"{type(model).__name__} has no quantized layer: quantize it first")
  return copy
