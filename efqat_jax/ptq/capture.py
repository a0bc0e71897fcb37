"""Capture what the layer-wise methods need, one layer at a time: ``H = X~^T X~`` and
``G = X~^T X``.

``X~`` holds the inputs the layer's weight multiplies in the quantized model (inputs quantized,
the layers before it already quantized by the method), ``X`` the same inputs in the float model;
rows are samples (tokens, or a convolution's patches), columns are the layer's inputs in
accumulation order (``efqat_jax.quant.rows``). A grouped convolution has one matrix per group.
The sums stream over the calibration batches, so memory holds one batch's activations and
``K x K`` per group; they are divided by the number of rows.

The layers of a ``nn.scan`` / ``nn.vmap`` stack are captured together, one matrix per layer of the
stack: each stacked layer is quantized for all its units at once, after the layers called
before it in the stack's body.

Example:
  >>> capture = statistics_capture(qmodel, variables, batches, ("h", "g"), train=False)
  >>> params = quantize_weights(PTQ_METHODS.get("gpfq"), variables["params"], layers,
  ...                           settings, capture=capture)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict
from jax import lax

from efqat_jax.nn.export import with_mode
from efqat_jax.nn.layer_table import QuantizedLayer, require_linen
from efqat_jax.nn.ops import CAPTURED_INPUT, Mode, capturing_inputs

STATISTICS = ("h", "g")
# (params, layer) -> the layer's statistics, captured with ``params`` (stacked like its weight).
Capture = Callable[[Any, QuantizedLayer], Mapping[str, jax.Array]]


def input_matrix(lhs: jax.Array, layer: QuantizedLayer) -> jax.Array:
  """``[groups, rows, K]``: the inputs one layer's weight multiplies, one row per sample."""
  op = dict(layer.op)
  if op["op"] == "conv":
    dn = op["dimension_numbers"]
    window = [layer.weight_shape[d] for d in dn.rhs_spec[2:]]
    patches = lax.conv_general_dilated_patches(
      lhs,
      window,
      op["window_strides"],
      op["padding"],
      rhs_dilation=op["rhs_dilation"],
      dimension_numbers=dn,
      precision=lax.Precision.HIGHEST,
    )
    rows = jnp.moveaxis(patches, dn.out_spec[1], -1)
    rows = rows.reshape(-1, rows.shape[-1])
    groups = op["feature_group_count"]
    return jnp.swapaxes(rows.reshape(rows.shape[0], groups, -1), 0, 1)
  (lc, _), _ = op["dimension_numbers"]
  k = math.prod(lhs.shape[d] for d in lc)
  rows = jnp.moveaxis(lhs, tuple(lc), tuple(range(lhs.ndim - len(lc), lhs.ndim)))
  return rows.reshape(1, -1, k)


def gram(left: jax.Array, right: jax.Array) -> jax.Array:
  """``left^T right`` per group: ``[groups, rows, K] x [groups, rows, K] -> [groups, K, K]``.

  Contracting the rows of two matrices laid out ``[K, rows]`` is the fast form on XLA:CPU
  (about 1.5x over contracting their leading axes in place).
  """
  left, right = (jnp.swapaxes(x.astype(jnp.float32), 1, 2) for x in (left, right))
  return jnp.einsum("gkr,glr->gkl", left, right, precision=lax.Precision.HIGHEST)


def grams(quantized: jax.Array, float_: jax.Array | None, layer: QuantizedLayer) -> dict:
  """This batch's sums ``X~^T X~`` (and ``X~^T X``), ``[groups, K, K]``, and its row count."""
  xq = input_matrix(quantized, layer)
  out = {"h": gram(xq, xq), "rows": jnp.asarray(xq.shape[1], jnp.float32)}
  if float_ is not None:
    out["g"] = gram(xq, input_matrix(float_, layer))
  return out


def captured_inputs(model: nn.Module, variables: dict, inputs: Any, **apply_kwargs) -> dict:
  """``{layer path: the input its weight multiplies}`` for one batch (stacked for a stack)."""
  require_linen(model, "captured_inputs")
  inputs = inputs if isinstance(inputs, tuple) else (inputs,)
  with capturing_inputs():
    _, state = model.apply(variables, *inputs, mutable=["params"], **apply_kwargs)
  flat = flatten_dict(state["params"])
  return {"/".join(k[:-1]): v for k, v in flat.items() if k[-1] == CAPTURED_INPUT}


def statistics_capture(
  model: nn.Module,
  variables: dict,
  batches: Sequence[Any],
  names: Sequence[str],
  **apply_kwargs,
) -> Capture:
  """A ``capture(params, layer) -> {name: [stack..., groups, K, K]}`` for ``quantize_weights``.

  Args:
    model: the quantized model (``efqat_jax.quantize``).
    variables: its calibrated variables; their params are the float weights ``X`` comes from.
    batches: the calibration inputs (a tuple is spread over the model's arguments).
    names: the statistics to capture, from ``("h", "g")``.
    **apply_kwargs: keyword arguments of ``model.apply`` (e.g. ``train=False``).
  """
  unknown = set(names) - set(STATISTICS)
  if unknown:
    raise ValueError(f"statistics must be among {STATISTICS}, got {sorted(unknown)}")
  if not batches:
    raise ValueError("statistics_capture needs at least one calibration batch")
  quantized_model = with_mode(model, Mode.QUANTIZE)
  float_model = with_mode(model, Mode.FLOAT)
  rest = {k: v for k, v in variables.items() if k != "params"}
  float_params = variables["params"]

  @jax.jit
  def quantized_inputs(params, inputs):
    return captured_inputs(quantized_model, {**rest, "params": params}, inputs, **apply_kwargs)

  @jax.jit
  def float_inputs(inputs):
    return captured_inputs(float_model, {**rest, "params": float_params}, inputs, **apply_kwargs)

  # One program per distinct layer (not per path): repeated layers compile once.
  gram_programs: dict[QuantizedLayer, Callable] = {}

  def capture(params: Any, layer: QuantizedLayer) -> dict[str, jax.Array]:
    key = layer.without_path()
    if key not in gram_programs:
      depth = len(layer.stack_shape)
      gram_programs[key] = jax.jit(_stacked(lambda q, f: grams(q, f, layer), depth))
    batch_grams = gram_programs[key]
    total = None
    for inputs in batches:
      xq = quantized_inputs(params, inputs)[layer.path]
      xf = float_inputs(inputs)[layer.path] if "g" in names else None
      sums = batch_grams(xq, xf)
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    rows = total.pop("rows")
    expand = lambda r: r.reshape(*r.shape, 1, 1, 1)
    return {name: total[name] / expand(rows) for name in names}

  return capture


def _stacked(fn, depth: int):
  for _ in range(depth):
    fn = jax.vmap(fn)
  return fn
