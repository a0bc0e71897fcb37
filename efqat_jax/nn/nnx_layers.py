"""How a quantized NNX layer runs: the NNX side of ``efqat_jax.nn.ops.QuantizedOps``.

A quantized ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv`` or ``nnx.Einsum`` is an instance
of a subclass of its class (``quantized_class``) whose ``__call__`` runs the original with the
layer's ``QuantizedOps`` current, and whose op field (``dot_general``, ``conv_general_dilated``,
``einsum_op``) calls that; an ``nnx.Embed``'s lookup and ``attend`` are re-run on the quantized
table. The layer's formats are a static attribute (``LayerQuant``), so they survive
``nnx.split`` / ``nnx.merge`` and every lifted transform. ``QuantizedOps`` reads and writes the
layer's own ``nnx.Param``s through a scope-like view of them; inside a transform, where NNX
cannot create variables, a run under ``Running(created=...)`` records the variables it would
create instead, so that they can be created before (``nnx_quantize.create_variables``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efqat_jax.nn.ops import QUANT_PARAM_NAMES, Mode, QuantizedOps
from efqat_jax.quant.spec import QuantSpec

# Layer kinds with their op field (None: the methods are re-run on the quantized table).
OP_FIELDS = {
  nnx.Linear: "dot_general",
  nnx.LinearGeneral: "dot_general",
  nnx.Conv: "conv_general_dilated",
  nnx.Einsum: "einsum_op",
  nnx.Embed: None,
}
QUANT_ATTRIBUTE = "efqat_quant"


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


@dataclasses.dataclass(frozen=True)
class Running:
  """How the quantized layers run now (a context, see ``running``).

  Attributes:
    initializing: quantization params are computed from their initialisers, as in Linen's
      ``init`` (inside ``quantize``).
    created: where a run records the variables it would create, by ``(layer path, name)``
      (one layer's shape); None: creating one is an error (NNX cannot create variables inside
      a transform, so they are created before, see ``create_variables``).
    params_mutable: whether writes into the params are allowed.
  """

  initializing: bool = False
  created: dict | None = None
  params_mutable: bool = True


_PLAIN = Running()  # a forward pass or training step
_RUNNING: contextvars.ContextVar[Running] = contextvars.ContextVar(
  "efqat_jax_nnx_running", default=_PLAIN
)


@contextlib.contextmanager
def running(context: Running) -> Iterator[None]:
  """Runs the quantized NNX layers called inside under ``context``."""
  token = _RUNNING.set(context)
  try:
    yield
  finally:
    _RUNNING.reset(token)


class _LayerScope:
  """The part of a Linen ``Scope`` that ``QuantizedOps`` uses, over one NNX layer's Variables,
  as the current ``Running`` says."""

  def __init__(self, layer: nnx.Module, context: Running):
    self.layer, self.context = layer, context
    self.path = tuple(getattr(layer, QUANT_ATTRIBUTE).path.split("/"))

  def _variable(self, name: str) -> nnx.Variable | None:
    value = vars(self.layer).get(name)
    return value if isinstance(value, nnx.Variable) else None

  def get_flag(self, name: str, default: Any = None) -> Any:
    return self.context.initializing if name == "initializing" else default

  def is_mutable_collection(self, collection: str) -> bool:
    return collection != "params" or self.context.params_mutable

  def has_variable(self, collection: str, name: str) -> bool:
    del collection
    if self.context.initializing and name in QUANT_PARAM_NAMES:
      return False
    return self._variable(name) is not None

  def get_variable(self, collection: str, name: str, default: Any = None) -> Any:
    del collection
    variable = self._variable(name)
    return default if variable is None else variable[...]

  def put_variable(self, collection: str, name: str, value: Any) -> None:
    del collection
    put_param(self.layer, self.path, name, value)

  def variable(self, collection: str, name: str, init: Callable[[], Any]):
    value = init()
    if self._variable(name) is not None or self.context.created is not None:
      self.put_variable(collection, name, value)
    return _Value(value)

  def variables(self) -> dict[str, dict[str, Any]]:
    params = {k: v[...] for k, v in vars(self.layer).items() if isinstance(v, nnx.Param)}
    return {"params": params}


def put_param(module: nnx.Module, path: tuple[str, ...], name: str, value: Any) -> None:
  """Writes ``value`` into the ``nnx.Param`` ``name`` of ``module`` (at ``path``); one that does
  not exist yet is recorded in the current ``Running.created`` (created before the real run),
  or is an error where nothing records."""
  variable = vars(module).get(name)
  context = _RUNNING.get()
  if isinstance(variable, nnx.Variable):
    variable[...] = value
  elif context.created is not None:
    context.created[(path, name)] = jax.ShapeDtypeStruct(jnp.shape(value), jnp.result_type(value))
  else:
    raise ValueError(
      f"{'/'.join(path)}: cannot create {name!r} on an NNX model here (calibration, input"
      " capture, the integer path and block-wise methods run through efqat_jax.nn.as_linen)"
    )


@dataclasses.dataclass(frozen=True)
class _Value:
  value: Any


# The quantized layer whose method runs now: (its QuantizedOps, the op field's float op).
_CURRENT: contextvars.ContextVar[QuantizedOps | None] = contextvars.ContextVar(
  "efqat_jax_nnx_layer", default=None
)


@contextlib.contextmanager
def _layer_ops(layer: nnx.Module, weight_name: str) -> Iterator[QuantizedOps]:
  quant: LayerQuant = getattr(layer, QUANT_ATTRIBUTE)
  ops = QuantizedOps(
    scope=_LayerScope(layer, _RUNNING.get()),  # type: ignore[arg-type]
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


QUANTIZED_OPS = {
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
    with _layer_ops(self, "kernel") as ops:
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
  with _layer_ops(self, "embedding") as ops:
    _no_sharding(out_sharding, ops.path)
    (table,) = self.promote_dtype((self.embedding[...],), dtype=self.dtype, inexact=False)
    return ops.take(table, inputs)


def _embed_attend(self, query, out_sharding=None):
  """``nnx.Embed.attend`` (the tied output projection) with the table quantized per row."""
  with _layer_ops(self, "embedding") as ops:
    _no_sharding(out_sharding, ops.path)
    query, table = self.promote_dtype((query, self.embedding[...]), dtype=self.dtype)
    return ops.dot_general(query, table, (((query.ndim - 1,), (1,)), ((), ())))
