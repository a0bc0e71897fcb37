"""``quantize(model, rules, *example_inputs)`` for Flax NNX models, without editing their code.

The NNX front end of the same quantized ops as the Linen one (``efqat_jax.nn.ops``): every
``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.Einsum`` and ``nnx.Embed`` (lookup and
``attend``) of a copy of the model computes with ``QuantizedOps``, also inside ``nnx.scan``,
``nnx.vmap`` and ``nnx.remat``. Rules match the module paths that ``nnx.state`` shows
(``/``-joined, e.g. ``"blocks/attn/query"``; the layers of a stack built with ``nnx.vmap`` share
one path), first match wins, as for Linen.

How, in NNX terms:
  - each quantized layer becomes a quantized NNX layer (``efqat_jax.nn.nnx_layers``);
  - quantization params are ``nnx.Param``s on the layer, next to its weight, with the names of
    the Linen front end (``kernel_scale``, ``input_scale``, ``input_zero_point``;
    ``embedding_scale``), stacked like the weight in a stack. NNX cannot create variables inside
    a transform, so ``quantize`` runs the model twice on the example inputs: abstractly, to learn
    the params' shapes; then for real (one compiled program), with the params created, to give
    them the values Linen's ``init`` gives (min-max of the weight and of the example batch).
    The model's other state (batch statistics, RNG counts) is left as it was.

Example:
  >>> rules = [QuantRule(".*", weight=QuantSpec.for_weights(4), input=QuantSpec.for_activations(8))]
  >>> qmodel = quantize(MyNnxCNN(rngs=nnx.Rngs(0)), rules, images)
  >>> logits = qmodel(images)                        # fake-quantized
  >>> nnx.state(qmodel, nnx.Param)["conv1"]["kernel_scale"]
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from efqat_jax.nn import layer_table
from efqat_jax.nn.nnx_layers import (
  OP_FIELDS,
  QUANT_ATTRIBUTE,
  QUANTIZED_OPS,
  LayerQuant,
  Running,
  quantized_class,
  running,
)
from efqat_jax.nn.ops import Mode
from efqat_jax.nn.rule import (
  QuantRule,
  check_all_rules_matched,
  first_rule,
  looks_like_weight,
  warn_unquantized_weights,
)

_FLOAT_OPS = {
  "dot_general": (lax.dot_general,),
  "conv_general_dilated": (lax.conv_general_dilated,),
  "einsum_op": (jnp.einsum,),
}
NNX_KINDS = "Linear, LinearGeneral, Conv, Einsum, Embed"
NNX_MODES = (Mode.QUANTIZE, Mode.FLOAT)  # the others write variables: through as_linen


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
      setattr(module, field, QUANTIZED_OPS[field])
    layers[name] = module
  stacked = _create_quant_params(qmodel, layers, example_args, example_kwargs)
  check_all_rules_matched(
    rules, matched, seen, stacked, type(model).__name__, NNX_KINDS, "nnx.vmap"
  )
  nnx.update(qmodel, before)  # the example call's side effects (batch stats, RNG counts) undone
  return qmodel


def nnx_quantizable_paths(model: nnx.Module) -> list[str]:
  """The paths of ``model``'s layers of a quantizable kind (quantized or kept float)."""
  return [
    _path(path) for path, module in nnx.iter_modules(model) if isinstance(module, tuple(OP_FIELDS))
  ]


def _check_mode(mode: Mode) -> None:
  if mode not in NNX_MODES:
    raise ValueError(
      f"mode must be one of {[m.name for m in NNX_MODES]} for an NNX model itself, got"
      f" {mode.name}: calibration and the integer path run on efqat_jax.nn.as_linen(model)"
    )


def _create_quant_params(qmodel, layers: dict, args: tuple, kwargs: dict) -> list[str]:
  """Creates every quantized layer's quantization params with their initial values; returns
  the paths of the stacked layers."""
  reported = create_variables(qmodel, args, kwargs, Running(initializing=True, created={}))
  with running(Running(initializing=True)):
    _call_compiled(qmodel, args, kwargs)
  return [path for path, layer in reported.items() if _stack_shape(layers[path], layer)]


def _call_compiled(model: nnx.Module, args: tuple, kwargs: dict) -> None:
  """``model(*args, **kwargs)`` as one compiled program, its updates written into ``model``.

  Array inputs are traced, any other value (a ``train`` flag) is passed as it is. Run eagerly,
  every operation of the model would compile on its own (several times slower on a ViT).
  """
  leaves, treedef = jax.tree.flatten((args, kwargs))
  traced = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]

  def call(module, arrays):
    given = iter(arrays)
    values = [
      next(given) if is_traced else leaf for leaf, is_traced in zip(leaves, traced, strict=True)
    ]
    call_args, call_kwargs = jax.tree.unflatten(treedef, values)
    module(*call_args, **call_kwargs)

  nnx.jit(call)(model, [leaf for leaf, is_traced in zip(leaves, traced, strict=True) if is_traced])


def create_variables(
  qmodel: nnx.Module, args: tuple, kwargs: dict, context: Running
) -> dict[str, layer_table.QuantizedLayer]:
  """Creates, as zero ``nnx.Param``s, the variables that calling ``qmodel(*args, **kwargs)``
  under ``context`` (whose ``created`` is a dict) would create, stacked like their layer's
  weight; returns the quantized layers the call runs (one layer of a stack each)."""
  with layer_table.recording() as reported, running(context):
    nnx.eval_shape(lambda m: m(*args, **kwargs), qmodel)
  modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(qmodel)}
  for (path, name), shape in context.created.items():
    key = "/".join(path)
    # The stack shape of the module's quantized layers (a block's inside it, a layer's own).
    layer = next(p for p in reported if p == key or p.startswith(key + "/"))
    stack = _stack_shape(modules[layer], reported[layer])
    setattr(modules[key], name, nnx.Param(jnp.zeros((*stack, *shape.shape), shape.dtype)))
  return dict(reported)


def _quantized_modules(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Module]]:
  """``(path, module)`` of every quantized layer of ``model``."""
  for path, module in nnx.iter_modules(model):
    if isinstance(vars(module).get(QUANT_ATTRIBUTE), LayerQuant):
      yield path, module


def _stack_shape(module: nnx.Module, layer: layer_table.QuantizedLayer) -> tuple[int, ...]:
  """The leading axes that ``nnx.vmap`` stacked onto ``module``'s weight."""
  weight = getattr(module, layer.weight_name)[...]
  return weight.shape[: weight.ndim - len(layer.weight_shape)]


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
  ``mode`` (``Mode.QUANTIZE`` or ``Mode.FLOAT``; the other modes write variables, which
  ``efqat_jax.nn.as_linen`` does)."""
  _check_mode(mode)
  copy = nnx.clone(model)
  set_mode(copy, mode)
  return copy


def set_mode(model: nnx.Module, mode: Mode) -> None:
  """Puts every quantized layer of ``model`` in ``mode``, in place."""
  found = False
  for _, module in _quantized_modules(model):
    setattr(
      module, QUANT_ATTRIBUTE, dataclasses.replace(getattr(module, QUANT_ATTRIBUTE), mode=mode)
    )
    found = True
  if not found:
    raise ValueError(f"{type(model).__name__} has no quantized layer: quantize it first")
