"""A quantized NNX model seen as a Linen module, so that the parts of the library written
against Linen's ``apply(variables, ...)`` run on it unchanged: calibration, the layer-wise PTQ
methods, Attention Round, QAT and EfQAT (selection, masks, the restricted backward), block
replacement, integer export, orbax checkpoints.

``as_linen(qmodel)`` returns ``(module, variables)``: ``variables`` is the NNX model's state as
Linen collections (``nnx.Param`` -> ``params``, ``nnx.BatchStat`` -> ``batch_stats``, RNG state
-> ``rng_count`` / ``rng_key``, keys as their key data) at the paths ``nnx.state`` shows, and
``module.apply`` runs a copy of the NNX model with those values. ``to_nnx(qmodel, variables)`` puts the values back
into an NNX model. Both front ends run the same ``QuantizedOps``; this adds no numerics.

What ``apply`` does, per call (at trace time):
  - merges the variables into a copy of the model; leaves the NNX model does not have (EfQAT's
    trainable channels, captured inputs) become ``nnx.Param``s on their layer, so that
    ``nnx.scan`` slices them like the layer's own;
  - makes the modules that ``quantized_layers`` and ``block_io`` watch report their calls
    and record or take their block inputs (their classes swapped for subclasses that do);
  - where ``params`` is mutable, runs the copy once abstractly to learn which variables the call
    would create (the running ranges of ``Mode.CALIBRATE``, captured inputs, accumulator maxima,
    recorded block inputs) and creates them, because NNX cannot create variables inside a
    transform;
  - runs the copy, and writes the state of the mutable collections back.
A ``train`` keyword that the NNX model's ``__call__`` does not take switches the copy with
``model.train()`` / ``model.eval()`` instead.

Example:
  >>> qmodel = efqat_jax.quantize(nnx_model, rules, images)
  >>> module, variables = as_linen(qmodel)
  >>> variables = efqat_jax.ptq.calibrate(module, variables, batches, num_batches=8)
  >>> qmodel = to_nnx(qmodel, variables)              # calibrated, back in NNX
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from efqat_jax.nn import layer_table
from efqat_jax.nn.blocks import active_block_io, run_block
from efqat_jax.nn.nnx_layers import Running, put_param, running
from efqat_jax.nn.nnx_quantize import create_variables, set_mode
from efqat_jax.nn.ops import Mode

_COLLECTIONS = {nnx.Param: "params", nnx.BatchStat: "batch_stats"}


def collection_of(variable: nnx.Variable) -> str:
  """The Linen collection an NNX variable goes to."""
  for kind, name in _COLLECTIONS.items():
    if isinstance(variable, kind):
      return name
  return _snake(type(variable).__name__)


def _snake(name: str) -> str:
  return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


def linen_variables(model: nnx.Module) -> dict[str, Any]:
  """The state of ``model`` as Linen collections, at its ``nnx.state`` paths."""
  return _collections(nnx.state(model))


def _collections(state: nnx.State) -> dict[str, Any]:
  """An NNX state as Linen collections."""
  flat: dict[str, dict] = {}
  for path, variable in nnx.to_flat_state(state):
    leaf = _linen_value(variable[...])
    flat.setdefault(collection_of(variable), {})[tuple(map(str, path))] = leaf
  return {collection: unflatten_dict(leaves) for collection, leaves in flat.items()}


def _is_key(value: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(value), jax.dtypes.prng_key)


def _linen_value(value: Any) -> Any:
  """A variable's value as Linen variables hold it: typed RNG keys as their key data (which
  checkpoints and digests can read)."""
  return jax.random.key_data(value) if _is_key(value) else value


def _nnx_value(value: Any, like: Any) -> Any:
  """A Linen variable's value for the NNX variable whose value is ``like``."""
  return jax.random.wrap_key_data(value, impl=jax.random.key_impl(like)) if _is_key(like) else value


class NnxAsLinen(nn.Module):
  """A quantized NNX model as a Linen module (see the module docstring).

  Attributes:
    model: the NNX model; read for its structure and variable kinds, never changed.
    mode: the mode of every quantized layer, or None for the modes the model has.
  """

  model: Any
  mode: Mode | None = None

  @nn.compact
  def __call__(self, *args, **kwargs):
    graphdef, template = nnx.split(self.model)
    known = {tuple(map(str, p)): (p, v) for p, v in nnx.to_flat_state(template)}
    values = _collections(template)  # the initial values, where a collection is not given
    holders = {
      (collection, top): self.variable(collection, top, lambda t=tree: t)
      for collection, trees in values.items()
      for top, tree in trees.items()
    }
    given = {
      (collection, *path): leaf
      for (collection, top), holder in holders.items()
      for path, leaf in flatten_dict({top: holder.value}).items()
    }
    state = [
      (p, v.replace(_nnx_value(given[(collection_of(v), *k)], v[...])))
      for k, (p, v) in known.items()
    ]
    copy = nnx.merge(graphdef, nnx.from_flat_state(state))
    for (collection, *path), value in given.items():
      if tuple(path) not in known:
        _attach(copy, collection, tuple(path), value)
    if self.mode is not None:
      set_mode(copy, self.mode)
    if layer_table.recording_calls():
      _report_calls(copy)
    for path in dict.fromkeys(io.path for io in active_block_io()):
      _make_block(_module_at(copy, tuple(path.split("/"))), path)
    args, kwargs = _train_switch(copy, args, kwargs)
    mutable = self.is_mutable_collection("params")
    if mutable:  # every variable lives in params: a call that cannot write them creates none
      create_variables(copy, args, kwargs, Running(created={}, params_mutable=True))
    with running(Running(params_mutable=mutable)):
      out = copy(*args, **kwargs)
    self._write_back(copy, holders)
    return out

  def _write_back(self, copy: nnx.Module, holders: dict) -> None:
    """Writes the copy's state into the mutable collections."""
    for collection, trees in linen_variables(copy).items():
      if not self.is_mutable_collection(collection):
        continue
      for top, tree in trees.items():
        holder = holders.get((collection, top))
        if holder is None:
          self.put_variable(collection, top, tree)
        else:
          holder.value = tree


def _attach(model: nnx.Module, collection: str, path: tuple[str, ...], value: Any) -> None:
  """Sets the leaf at ``path`` (``module path..., name``) on its module as an NNX variable."""
  if collection != "params":
    raise ValueError(f"{'/'.join(path)}: the NNX model has no {collection} variable there")
  setattr(_module_at(model, path[:-1]), path[-1], nnx.Param(value))


def _module_at(model: nnx.Module, path: tuple[str, ...]) -> nnx.Module:
  node = model
  for part in path:
    node = node[int(part)] if isinstance(node, nnx.List | list) else getattr(node, part)
  return node


_MODULE_PATH = "efqat_module_path"


def _make_block(module: nnx.Module, path: str) -> None:
  """Makes ``module`` (at ``path``) record and/or be fed its input as the active ``block_io``
  contexts for ``path`` say (the NNX side of ``efqat_jax.nn.blocks.block_io``)."""
  module.__class__ = _block_class(type(module))
  setattr(module, _MODULE_PATH, path)


@functools.cache
def _block_class(cls: type[nnx.Module]) -> type[nnx.Module]:
  def __call__(self, *args, **kwargs):
    path = getattr(self, _MODULE_PATH)
    call = functools.partial(cls.__call__, self)
    for io in (io for io in active_block_io() if io.path == path and args):
      call = functools.partial(run_block, io, call, variables=_NnxBlockVariables(self, path))
      call = _positional(call)
    return call(*args, **kwargs)

  return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})


def _positional(run):
  """``run(args, kwargs)`` as a function of ``*args, **kwargs``."""
  return lambda *args, **kwargs: run(args, kwargs)


class _NnxBlockVariables:
  """An NNX module's params as ``efqat_jax.nn.blocks.BlockVariables``."""

  def __init__(self, module: nnx.Module, path: str):
    self.module, self.path = module, tuple(path.split("/"))

  def has(self, name: str) -> bool:
    return isinstance(vars(self.module).get(name), nnx.Variable)

  def get(self, name: str) -> Any:
    return getattr(self.module, name)[...]

  def put(self, name: str, value: Any) -> None:
    put_param(self.module, self.path, name, value)


def _report_calls(model: nnx.Module) -> None:
  """Makes every submodule of ``model`` with variables of its own report its calls to
  ``layer_table`` (the order ``quantized_layers`` attaches norms and float layers by)."""
  for path, module in nnx.iter_modules(model):
    if path and any(isinstance(v, nnx.Variable) for v in vars(module).values()):
      module.__class__ = _reporting_class(type(module))
      setattr(module, _MODULE_PATH, "/".join(map(str, path)))


@functools.cache
def _reporting_class(cls: type[nnx.Module]) -> type[nnx.Module]:
  def __call__(self, *args, **kwargs):
    layer_table.report_call(getattr(self, _MODULE_PATH))
    return cls.__call__(self, *args, **kwargs)

  return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})


def _train_switch(model: nnx.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
  """Turns a ``train`` keyword the model does not take into ``model.train()`` /
  ``model.eval()``."""
  if "train" not in kwargs or "train" in inspect.signature(model.__call__).parameters:
    return args, kwargs
  kwargs = dict(kwargs)
  model.train() if kwargs.pop("train") else model.eval()
  return args, kwargs


def as_linen(model: nnx.Module, mode: Mode | None = None) -> tuple[NnxAsLinen, dict[str, Any]]:
  """The quantized NNX ``model`` as a Linen module and its variables (see the module
  docstring)."""
  if not isinstance(model, nnx.Module):
    raise TypeError(f"as_linen takes an NNX model, got {type(model).__name__}")
  return NnxAsLinen(model=model, mode=mode), linen_variables(model)


def to_nnx(model: nnx.Module, variables: dict[str, Any]) -> nnx.Module:
  """A copy of ``model`` with the values of ``variables`` (from ``as_linen``'s module):
  its own variables updated; ``quant_stats`` and leaves it does not have are left out."""
  copy = nnx.clone(model)
  known = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(copy))}
  for collection, tree in variables.items():
    for path, value in flatten_dict(tree).items():
      variable = known.get(path)
      if variable is not None and collection_of(variable) == collection:
        variable[...] = _nnx_value(value, variable[...])
  return copy
