"""The quantized layers of a model: what each computes and where its params sit.

Params alone do not say which kernel axes are output channels, nor which leading axes
``nn.scan`` / ``nn.vmap`` stacked onto a layer's params. ``quantized_layers`` traces the model
once, abstractly, and every quantized op reports its layer: weight name, formats, the shape and
output-channel axes of one layer's weight, and the op's settings (for integer export). The
stack shape is what the stored weight has in front of one layer's shape.

A *unit* is one layer of a stack: ``"path"`` for an unstacked layer, ``"path[i]"`` (or
``"path[i,j]"`` for nested stacks) for layer i of a stack. EfQAT selects, and export writes, units.

Example:
  >>> layers = quantized_layers(qmodel, variables, images)
  >>> layers["blocks/Dense_0"].stack_shape, layers["blocks/Dense_0"].units()
  ((3,), ['blocks/Dense_0[0]', 'blocks/Dense_0[1]', 'blocks/Dense_0[2]'])
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import math
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax

from efqat_jax.quant.spec import QuantSpec

# The leaf ``restrict_backward`` adds next to a partly trained weight: its trainable channels.
GRAD_CHANNELS = "weight_grad_channels"


@dataclasses.dataclass(frozen=True)
class QuantizedLayer:
  """One quantized layer (static: hashable, no arrays).

  Attributes:
    path: module path, ``/``-joined, relative to the model.
    weight_name: the weight param: ``"kernel"``, or ``"embedding"`` for ``nn.Embed``.
    weight_spec: the weight's format with its axes resolved for one layer's weight.
    input_spec: the input format, or None.
    weight_shape: one layer's weight shape.
    out_axes: the axes of ``weight_shape`` that are output channels (ascending; channels are
      flattened over them in C order).
    op: ``(name, value)`` pairs of the op's settings (``op``, ``dimension_numbers``, ...).
    stack_shape: the leading axes that ``nn.scan`` / ``nn.vmap`` add to the stored weight.
    attached: the modules without a quantized weight whose params go with this layer (see
      ``quantized_layers``), by path.
    macs_per_weight: the multiply-adds each weight takes part in, in the traced call (a conv's
      output pixels times the batch, a Dense layer's tokens; for a lookup, the rows read per
      row): the layer's weight gradient costs its weights times this. Not compared: the same
      layer traced with another batch is the same layer.
  """

  path: str
  weight_name: str
  weight_spec: QuantSpec
  input_spec: QuantSpec | None
  weight_shape: tuple[int, ...]
  out_axes: tuple[int, ...]
  op: tuple[tuple[str, Any], ...]
  stack_shape: tuple[int, ...] = ()
  attached: tuple[str, ...] = ()
  macs_per_weight: float = dataclasses.field(default=0.0, compare=False)

  @property
  def scale_name(self) -> str:
    return f"{self.weight_name}_scale"

  @property
  def num_channels(self) -> int:
    return math.prod(self.weight_shape[a] for a in self.out_axes)

  def indices(self) -> list[tuple[int, ...]]:
    """The stack index of every unit, in C order (``[()]`` for an unstacked layer)."""
    return list(itertools.product(*map(range, self.stack_shape)))

  def unit(self, index: tuple[int, ...]) -> str:
    return self.path if not index else f"{self.path}[{','.join(map(str, index))}]"

  def units(self) -> list[str]:
    return [self.unit(index) for index in self.indices()]

  def without_path(self) -> QuantizedLayer:
    """This layer with no path and no attached modules: equal for the layers a program treats
    alike (a key that lets the repeated layers of a deep model share a compiled program)."""
    return dataclasses.replace(self, path="", attached=())


_RECORDERS: contextvars.ContextVar[tuple[dict[str, QuantizedLayer], ...]] = contextvars.ContextVar(
  "efqat_jax_layer_recorders", default=()
)


def macs_per_weight(
  settings: dict[str, Any], weight_shape: tuple[int, ...], out_size: int
) -> float:
  """The multiply-adds each weight takes part in when an op with ``settings`` (``op``,
  ``dimension_numbers``) gives ``out_size`` output elements, i.e. what its weight gradient costs
  per weight: output elements times the multiply-adds per output element, over the weights. A
  lookup copies one row per id: 1 per output element."""
  weights = math.prod(weight_shape)
  if settings["op"] == "dot_general":
    (_, contracting), _ = settings["dimension_numbers"]
    per_output = math.prod(weight_shape[d] for d in contracting)
  elif settings["op"] == "conv":
    per_output = weights // weight_shape[settings["dimension_numbers"].rhs_spec[0]]
  else:
    per_output = 1
  return out_size * per_output / weights


def is_recording() -> bool:
  """Whether a quantized op's layer is being recorded (``recording``)."""
  return bool(_RECORDERS.get())


def report(layer: QuantizedLayer) -> None:
  """Called by a quantized op while it runs: records its layer. The first call of a path wins,
  except that a tied embedding is recorded by its output projection (``attend``, which also
  quantizes its input) rather than by its lookup."""
  for recorder in _RECORDERS.get():
    seen = recorder.get(layer.path)
    if seen is None or (dict(seen.op)["op"] == "take" and dict(layer.op)["op"] != "take"):
      recorder[layer.path] = layer


@contextlib.contextmanager
def recording() -> Iterator[dict[str, QuantizedLayer]]:
  """Collects the layers every quantized op reports within (by absolute module path)."""
  layers: dict[str, QuantizedLayer] = {}
  token = _RECORDERS.set((*_RECORDERS.get(), layers))
  try:
    yield layers
  finally:
    _RECORDERS.reset(token)


_CALLS: contextvars.ContextVar[dict[str, None] | None] = contextvars.ContextVar(
  "efqat_jax_module_calls", default=None
)


def recording_calls() -> bool:
  """Whether ``quantized_layers`` is recording which modules a model calls, in what order."""
  return _CALLS.get() is not None


def report_call(path: str) -> None:
  """Called when the module at ``path`` (relative to the model) is called: its first call
  places it in the call order that ``quantized_layers`` attaches modules by."""
  called = _CALLS.get()
  if called is not None:
    called.setdefault(path, None)


def params_at(params: Any, path: str) -> Any:
  """The subtree of ``params`` at a ``/``-joined module path (``""``: the whole tree)."""
  for name in path.split("/") if path else ():
    params = params[name]
  return params


def with_params_at(params: Any, path: str, entries: dict[str, Any]) -> Any:
  """``params`` with ``entries`` put into the subtree at ``path`` (a copy along the path; the
  other subtrees are shared)."""
  if not path:
    return {**params, **entries}
  head, _, rest = path.partition("/")
  return {**params, head: with_params_at(params[head], rest, entries)}


def require_linen(model: Any, what: str) -> None:
  """Raises TypeError, in one line, if ``model`` is a Flax NNX module: ``what`` is Linen-only."""
  if any(c.__module__.startswith("flax.nnx") for c in type(model).__mro__):
    raise TypeError(
      f"{what} takes a Linen model: for a quantized NNX model, pass the module and variables"
      " that efqat_jax.nn.as_linen(model) returns"
    )


def quantized_layers(model: Any, variables: Any, *args, **kwargs) -> dict[str, QuantizedLayer]:
  """Every quantized layer ``model.apply(variables, *args, **kwargs)`` runs, by path, in the
  order they first run, with the modules attached to each.

  Traces abstractly (``jax.eval_shape``): nothing is computed. Pass the arguments of an
  evaluation call (e.g. ``train=False``), so that no rng is needed.

  Raises:
    ValueError: if the model runs no quantized layer.
  """
  require_linen(model, "quantized_layers")
  root = "/".join(model.scope.path) if model.scope is not None else ""
  relative = lambda path: path[len(root) + 1 :] if root and path.startswith(root + "/") else path
  called: dict[str, None] = {}

  def record_call(next_fun, call_args, call_kwargs, context):
    if context.module.scope is not None:
      report_call(relative("/".join(context.module.scope.path)))
    return next_fun(*call_args, **call_kwargs)

  token = _CALLS.set(called)  # NNX models run through as_linen report their calls here too
  try:
    with recording() as layers, nn.intercept_methods(record_call):
      jax.eval_shape(lambda v: model.apply(v, *args, **kwargs), variables)
  finally:
    _CALLS.reset(token)
  if not layers:
    raise ValueError(f"{type(model).__name__} runs no quantized layer (with a quantized weight)")
  table = {}
  for path, layer in layers.items():
    path = relative(path)
    weight = params_at(variables["params"], path)[layer.weight_name]
    stack = tuple(weight.shape[: weight.ndim - len(layer.weight_shape)])
    table[path] = dataclasses.replace(layer, path=path, stack_shape=stack)
  attached = _attach(list(called), table, variables["params"])
  return {
    path: dataclasses.replace(layer, attached=attached[path]) for path, layer in table.items()
  }


def own_params(params: Any, path: str) -> dict[str, Any]:
  """The params of the module at ``path`` itself (not of its submodules); empty if none."""
  try:
    node = params_at(params, path)
  except (KeyError, TypeError):
    return {}
  return {name: value for name, value in node.items() if not isinstance(value, Mapping)}


def _attach(
  called: list[str], layers: Mapping[str, QuantizedLayer], params: Any
) -> dict[str, tuple[str, ...]]:
  """Per layer path, the modules with params of their own (and no quantized weight) attached to
  it (see the module docstring), in call order."""
  order = {path: i for i, path in enumerate(called)}
  ranked = sorted(layers, key=lambda path: order.get(path, len(order)))
  attached: dict[str, list[str]] = {path: [] for path in layers}
  for path in called:
    if path in layers or not own_params(params, path):
      continue
    parent = path.rpartition("/")[0]
    near = [layer for layer in ranked if layer.startswith(parent + "/")] if parent else ranked
    before = [layer for layer in near or ranked if order.get(layer, len(order)) < order[path]]
    attached[before[-1] if before else (near or ranked)[0]].append(path)
  return {path: tuple(paths) for path, paths in attached.items()}
