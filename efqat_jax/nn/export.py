"""Integer export of a quantized Flax model, and its integer reference forward pass."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from efqat_jax.nn.ops import ACCUMULATOR, Mode, record_integer_layers
from efqat_jax.quant.integer import IntegerLayer


def params_at(params: Any, path: str) -> Any:
  """The subtree of ``params`` at a ``/``-joined module path (``""``: the whole tree)."""
  for name in path.split("/") if path else ():
    params = params[name]
  return params


def with_mode(model: nn.Module, mode: Mode) -> nn.Module:
  """``model`` switched to ``mode`` (a QuantizedModel or a Quant layer: anything with a mode field)."""
  if "mode" not in {f.name for f in dataclasses.fields(model)}:
    raise ValueError(
      f"{type(model).__name__} has no 'mode' field: use a model from efqat_jax.quantize(), a Quant"
      " layer, or build your model with its quantized layers' mode set"
    )
  return model.clone(mode=mode)


def integer_apply(model: nn.Module, variables: Any, *args, **kwargs) -> tuple[Any, dict]:
  """Runs ``model`` with every quantized layer on the integer reference path.

  Returns:
    ``(output, accumulators)``: the model's output and, per layer path, the largest
    accumulator magnitude seen (``{"Dense_0": {"max_abs": ...}, ...}``).
  """
  out, state = with_mode(model, Mode.INTEGER).apply(
    variables, *args, mutable=[ACCUMULATOR], **kwargs
  )
  return out, state.get(ACCUMULATOR, {})


def export_integer(model: nn.Module, variables: Any, *args, **kwargs) -> dict[str, IntegerLayer]:
  """Integer weights, scales and zero points of every quantized layer, keyed by module path.

  The model runs once, eagerly, on the sample inputs ``args`` so that every layer reports the
  op it computes (dimension numbers, strides, padding). Biases stay float.

  Example:
    >>> layers = export_integer(qmodel, variables, images)
    >>> y, acc_max = efqat_jax.quant.apply_integer(layers["Conv_0"], conv0_input)
  """
  with record_integer_layers() as layers:
    with_mode(model, Mode.INTEGER).apply(variables, *args, **kwargs)
  if not layers:
    raise ValueError(f"{type(model).__name__} has no quantized layer with a quantized kernel")
  exported = {}
  for path, layer in layers.items():
    bias = params_at(variables["params"], path).get("bias")
    exported[path] = dataclasses.replace(layer, bias=bias)
  return jax.device_get(exported)
