"""Integer export of a quantized Flax model, and its integer reference forward pass."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict

from efqat_jax.nn import nnx_quantize
from efqat_jax.nn.layer_table import QuantizedLayer, params_at, quantized_layers
from efqat_jax.nn.ops import ACCUMULATOR_MAX, Mode
from efqat_jax.quant.fake_quant import valid_scale, valid_zero_point
from efqat_jax.quant.integer import IntegerLayer, export_layer


def with_mode(model: nn.Module | nnx.Module, mode: Mode) -> nn.Module | nnx.Module:
  """``model`` switched to ``mode`` (a QuantizedModel or a Quant layer: anything with a mode
  field; or a quantized NNX model, copied with its arrays shared)."""
  if isinstance(model, nnx.Module):
    return nnx_quantize.with_mode(model, mode)
  if "mode" not in {f.name for f in dataclasses.fields(model)}:
    raise ValueError(
      f"{type(model).__name__} has no 'mode' field: use a model from efqat_jax.quantize(), a Quant"
      " layer, or build your model with its quantized layers' mode set"
    )
  return model.clone(mode=mode)


def integer_apply(model: nn.Module, variables: Any, *args, **kwargs) -> tuple[Any, dict]:
  """Runs ``model`` with every quantized layer on the integer reference path.

  Returns:
    ``(output, accumulators)``: the model's output and, per unit (a layer, or one layer of a
    stack: ``"blocks/Dense_0[2]"``), the largest accumulator magnitude seen
    (``{"Dense_0": {"max_abs": ...}, ...}``).
  """
  out, state = with_mode(model, Mode.INTEGER).apply(variables, *args, mutable=["params"], **kwargs)
  accumulators = {}
  for path, value in flatten_dict(state["params"]).items():
    if path[-1] == ACCUMULATOR_MAX:
      layer = "/".join(path[:-1])
      for index in np.ndindex(np.shape(value)):
        unit = layer if not index else f"{layer}[{','.join(map(str, index))}]"
        accumulators[unit] = {"max_abs": value[index]}
  return out, accumulators


def export_integer(model: nn.Module, variables: Any, *args, **kwargs) -> dict[str, IntegerLayer]:
  """Integer weights, scales and zero points of every quantized layer, keyed by unit.

  A unit is a layer, or one layer of an ``nn.scan`` / ``nn.vmap`` stack (``"blocks/Dense_0[2]"``;
  see ``quantized_layers``). The model is traced once, abstractly, on the sample inputs ``args``
  so that every layer reports the op it computes (dimension numbers, strides, padding); the
  integers come from the concrete params. Biases stay float.

  Example:
    >>> layers = export_integer(qmodel, variables, images)
    >>> y, acc_max = efqat_jax.quant.apply_integer(layers["Conv_0"], conv0_input)
  """
  table = quantized_layers(model, variables, *args, **kwargs)
  params = jax.device_get(variables["params"])
  exported = {}
  for layer in table.values():
    for index in layer.indices():
      exported[layer.unit(index)] = _export_unit(layer, params_at(params, layer.path), index)
  return jax.device_get(exported)


def _export_unit(layer: QuantizedLayer, params: Any, index: tuple[int, ...]) -> IntegerLayer:
  """One unit's IntegerLayer from its layer's (possibly stacked) params."""
  at = lambda name: None if params.get(name) is None else np.asarray(params[name])[index]
  quantized_input = layer.input_spec is not None
  zero_point = at("input_zero_point") if quantized_input else None
  input_scale = at("input_scale") if quantized_input else None
  return export_layer(
    at(layer.weight_name),
    valid_scale(at(layer.scale_name)),
    layer.weight_spec,
    None if input_scale is None else valid_scale(input_scale),
    None if zero_point is None else valid_zero_point(zero_point, layer.input_spec),
    layer.input_spec,
    bias=at("bias"),
    **dict(layer.op),
  )
