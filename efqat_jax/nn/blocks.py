"""Blocks of a model: the modules that block-wise methods reconstruct or replace one at a time,
found by module path, and their inputs and outputs recorded or fed in from outside.

A block is a module that holds quantized layers (a residual block, a Transformer layer, a single
layer), named by its module path (``/``-joined, relative to the model, as ``quantize`` names
layers); blocks are found from the layers' paths alone, so they are checked before anything runs.
The
module a ``nn.scan`` / ``nn.vmap`` stack runs is one block whose every unit is a block of its own:
its inputs and outputs are stacked like its params, one slice per unit.

``block_io`` works through ``nn.intercept_methods``, so the model's code is not edited: it records
what the block receives (its first argument, an array or a pytree of arrays) and returns, in the
``params`` collection of the block (which must be mutable), and can replace that first argument
by arrays put there beforehand. The rest of the model still runs; with the block's input fed in,
whatever only computed that input is dead code, which ``jax.jit`` removes.

Example:
  >>> blocks = find_blocks(list(quantized_layers(model, variables, images)), "auto")
  >>> with block_io(blocks[1].path, record=True):
  ...   _, state = model.apply(variables, images, train=False, mutable=["params"])
  >>> inputs, outputs = recorded_io(state["params"], blocks[1].path)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax

from efqat_jax.nn.layer_table import params_at, with_params_at

BLOCK_INPUT = "block_input"
BLOCK_OUTPUT = "block_output"
BLOCK_UNIT = "block_unit"  # where fed inputs replace a stack's own: True at the fed units
AUTO = "auto"  # the model's top-level submodules
LAYERS = "layers"  # every quantized layer alone


@dataclasses.dataclass(frozen=True)
class Block:
  """A module reconstructed (or replaced) as one piece.

  Attributes:
    path: its module path.
    layers: the quantized layers inside it, in call order.
  """

  path: str
  layers: tuple[str, ...]


def module_paths(layer_paths: Sequence[str]) -> list[str]:
  """Every module path holding one of ``layer_paths`` (the layers and all their ancestors),
  in first-call order."""
  paths: dict[str, None] = {}
  for path in layer_paths:
    parts = path.split("/")
    for depth in range(1, len(parts) + 1):
      paths.setdefault("/".join(parts[:depth]), None)
  return list(paths)


def _list_items(path: str, modules: Sequence[str]) -> list[str]:
  """The items ``path/0``, ``path/1``, ... if ``path`` is a list of modules, else []."""
  children = [m for m in modules if m.rpartition("/")[0] == path]
  numbered = all(c.rpartition("/")[2].isdigit() for c in children)
  return children if children and numbered else []


def find_blocks(layer_paths: Sequence[str], pattern: str, field: str = "blocks") -> list[Block]:
  """The blocks of a model whose quantized layers are ``layer_paths`` (in call order), in call
  order, every layer in exactly one.

  Args:
    layer_paths: the quantized layers' paths in call order (``quantized_layers``).
    pattern: ``"auto"`` (the model's top-level submodules; the items of a top-level NNX list
      of modules), ``"layers"`` (each layer alone), or a
      regex fully matching the module paths of the blocks. Layers outside every block are blocks
      of their own.
    field: the name to give in errors (a config field).

  Raises:
    ValueError: a regex that is invalid, matches no module holding a quantized layer, or matches
      one block inside another.
  """
  if pattern == LAYERS:
    return [Block(path, (path,)) for path in layer_paths]
  modules = module_paths(layer_paths)
  if pattern == AUTO:
    chosen = [p for p in modules if "/" not in p]
    # An NNX list of modules (``blocks/0``, ``blocks/1``) is a container: its items are blocks.
    chosen = [q for p in chosen for q in (_list_items(p, modules) or [p])]
  else:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{field} = {pattern!r} is not a valid regex: {e}") from e
    chosen = [p for p in modules if regex.fullmatch(p)]
  if not chosen:
    raise ValueError(
      f"{field} = {pattern!r} matches no module holding a quantized layer; those modules are"
      f" {modules}"
    )
  for outer in chosen:
    inner = next((p for p in chosen if p != outer and contains(outer, p)), None)
    if inner is not None:
      raise ValueError(f"{field} = {pattern!r} matches {inner!r} inside {outer!r}: blocks nest")
  blocks = [Block(p, tuple(x for x in layer_paths if contains(p, x))) for p in chosen]
  covered = {x for b in blocks for x in b.layers}
  blocks += [Block(path, (path,)) for path in layer_paths if path not in covered]
  order = {path: i for i, path in enumerate(layer_paths)}
  return sorted(blocks, key=lambda b: order[b.layers[0]])


def contains(outer: str, path: str) -> bool:
  """Whether the module path ``path`` is ``outer`` or inside it."""
  return path == outer or path.startswith(outer + "/")


@dataclasses.dataclass(frozen=True, eq=False)
class BlockIO:
  """What an active ``block_io`` does at one block (see there)."""

  path: str
  record: bool = False
  feed: bool = False
  traced_shapes: list | None = None


class BlockVariables(Protocol):
  """Where a block keeps what it records and reads what it is fed: its Linen scope, or an NNX
  module's variables (``efqat_jax.nn.nnx_linen``)."""

  def has(self, name: str) -> bool: ...
  def get(self, name: str) -> Any: ...
  def put(self, name: str, value: Any) -> None: ...


_BLOCK_IO: contextvars.ContextVar[tuple[BlockIO, ...]] = contextvars.ContextVar(
  "efqat_jax_block_io", default=()
)


def active_block_io() -> tuple[BlockIO, ...]:
  """The ``block_io`` contexts active now, innermost last."""
  return _BLOCK_IO.get()


def run_block(io: BlockIO, call, args: tuple, kwargs: dict, variables: BlockVariables) -> Any:
  """``call(*args, **kwargs)``, the block's own call, with its first argument fed and/or its
  input and output recorded as ``io`` says."""
  first, treedef = jax.tree.flatten(args[0])
  if io.feed:
    fed = [variables.get(f"{BLOCK_INPUT}_{i}") for i in range(len(first))]
    if variables.has(BLOCK_UNIT):
      unit = variables.get(BLOCK_UNIT)
      fed = [jax.numpy.where(unit, x, own) for x, own in zip(fed, first, strict=True)]
    first = fed
    args = (jax.tree.unflatten(treedef, first), *args[1:])
  out = call(*args, **kwargs)
  if io.traced_shapes is not None:
    shapes = lambda leaves: [jax.numpy.shape(x) for x in leaves]
    io.traced_shapes.append((shapes(first), shapes(jax.tree.leaves(out))))
  if io.record:
    for name, leaves in ((BLOCK_INPUT, first), (BLOCK_OUTPUT, jax.tree.leaves(out))):
      for i, leaf in enumerate(leaves):
        variables.put(f"{name}_{i}", leaf)
  return out


@dataclasses.dataclass(frozen=True)
class _ScopeVariables:
  """A Linen module's ``params`` as ``BlockVariables``."""

  module: nn.Module

  def has(self, name: str) -> bool:
    return self.module.has_variable("params", name)

  def get(self, name: str) -> Any:
    return self.module.get_variable("params", name)

  def put(self, name: str, value: Any) -> None:
    if not self.module.is_mutable_collection("params"):
      raise ValueError(f"block_io needs apply(..., mutable=['params']) ({self.module.scope.path})")
    self.module.put_variable("params", name, value)


@contextlib.contextmanager
def block_io(
  path: str, record: bool = False, feed: bool = False, traced_shapes: list | None = None
) -> Iterator[None]:
  """Records and/or feeds the input of the module at ``path`` for every top-level
  ``model.apply`` traced inside; the ``params`` collection must be mutable.

  Args:
    path: the block's module path.
    record: put the block's first argument and its output into its params
      (``block_input_<i>``, ``block_output_<i>``: the leaves of each).
    feed: call the block with the leaves ``block_input_<i>`` of its params as its first
      argument (same structure as the argument it is called with); where its params hold a
      ``block_unit`` mask (``with_block_input(..., units=...)``), only the units of a stack
      where it is True take them, the others keep their own input.
    traced_shapes: if given, gets ``(input leaf shapes, output leaf shapes)`` appended each time
      the block is traced: one unit's shapes inside a stack, so the recorded leaves' extra
      leading axes are the stack's.
  """
  io = BlockIO(path, record, feed, traced_shapes)
  target = tuple(path.split("/"))

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.scope is None:
      return next_fun(*args, **kwargs)
    if tuple(module.scope.path) != target or not args:
      return next_fun(*args, **kwargs)
    return run_block(io, next_fun, args, kwargs, _ScopeVariables(module))

  token = _BLOCK_IO.set((*_BLOCK_IO.get(), io))
  try:
    with nn.intercept_methods(interceptor):
      yield
  finally:
    _BLOCK_IO.reset(token)


def recorded_io(params: Any, path: str) -> tuple[list[jax.Array], list[jax.Array]]:
  """``(input leaves, output leaves)`` that ``block_io(path, record=True)`` put into ``params``."""
  node = params_at(params, path)
  leaves = lambda name: [node[f"{name}_{i}"] for i in range(_count(node, name))]
  return leaves(BLOCK_INPUT), leaves(BLOCK_OUTPUT)


def with_block_input(
  params: Any, path: str, leaves: Sequence[jax.Array], units: jax.Array | None = None
) -> Any:
  """``params`` with ``leaves`` put where ``block_io(path, feed=True)`` reads them (a copy along
  the path; the other subtrees are shared).

  Args:
    params: the model's params.
    path: the block's module path.
    leaves: the input's leaves (stacked like the block's params inside a stack).
    units: for a stacked block, a bool array shaped like the stack: the units fed ``leaves``
      (the others run on their own input); None feeds every unit.
  """
  fed = {f"{BLOCK_INPUT}_{i}": x for i, x in enumerate(leaves)}
  return with_params_at(params, path, fed if units is None else {**fed, BLOCK_UNIT: units})


def _count(node: Mapping[str, Any], name: str) -> int:
  n = 0
  while f"{name}_{n}" in node:
    n += 1
  return n
