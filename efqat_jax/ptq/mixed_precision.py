"""Mixed precision: each layer's weight bits from a candidate set, under the weight memory of a
uniform-precision model, allocated by an importance per layer (``bit_allocation``).

Two importances, both of the float weights before any rounding:
- ``coding_length`` (Attention Round's measure): the lossy coding length ``L`` of the layer's
  kernel, rows as vectors (``efqat_jax.quant.coding_length``), read as the bits per weight the
  layer needs to be coded at a common distortion. Rounded at ``b`` bits instead, its distortion
  power grows as ``4^(L - b)``; the importance ``weights * 4^L`` makes the allocation minimise
  the total of that, so layers get ``b = L + constant`` bits (the constant set by the budget), with
  no search over assignments. (Used as the importance directly, the total coding length
  ``weights * L`` would need a layer to code 4 times longer per weight to earn one bit more.)
- ``sensitivity`` (the usual baseline): how much the loss grows when that layer alone has its
  weights rounded to nearest, at ``probe_bits`` bits.
The layers of a ``nn.scan`` / ``nn.vmap`` stack share one format: their importances and sizes add.

Example:
  >>> importance = coding_length_importance(params, layers, distortion=0.1)
  >>> bits = allocate_bits(importance, layer_sizes(layers), (2, 3, 4, 5, 6, 8), 4, fixed)
  >>> formats = with_weight_bits(formats, bits)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from efqat_jax.nn.layer_table import QuantizedLayer, params_at, with_params_at
from efqat_jax.nn.ops import WEIGHT_ESTIMATORS
from efqat_jax.quant.coding_length import weight_coding_length
from efqat_jax.quant.fake_quant import fake_quant
from efqat_jax.quant.rows import kernel_axes, to_rows

IMPORTANCES = ("coding_length", "sensitivity")


def layer_sizes(layers: Mapping[str, QuantizedLayer]) -> dict[str, int]:
  """Weights per layer, every unit of a stack counted."""
  return {p: math.prod(x.stack_shape) * math.prod(x.weight_shape) for p, x in layers.items()}


def _units(params: Any, layer: QuantizedLayer) -> jax.Array:
  """The layer's weights as ``[units, *weight_shape]``."""
  weight = params_at(params, layer.path)[layer.weight_name]
  return jnp.reshape(weight, (-1, *layer.weight_shape))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unit_coding_lengths(units: jax.Array, out_axes, in_axes, distortion: float) -> jax.Array:
  """Per-weight coding length of each unit's kernel (one program per kernel shape)."""
  return jax.vmap(lambda w: weight_coding_length(to_rows(w, out_axes, in_axes), distortion))(units)


def coding_length_importance(
  params: Any, layers: Mapping[str, QuantizedLayer], distortion: float
) -> dict[str, float]:
  """``sum over units of weights * 4^(L - L_max)`` per layer, with ``L`` each unit's coding
  length per weight at an RMS error per weight of ``distortion`` times the kernel's RMS (see the
  module docstring; ``L_max``, the largest over all units, only keeps the powers finite)."""
  lengths = {}
  for path, layer in layers.items():
    op = dict(layer.op)
    axes = kernel_axes(op["op"], op["dimension_numbers"], len(layer.weight_shape))
    lengths[path] = _unit_coding_lengths(_units(params, layer), *axes, distortion)
  top = max(float(jnp.max(v)) for v in lengths.values())
  return {
    path: float(jnp.sum(4.0 ** (v - top))) * math.prod(layers[path].weight_shape)
    for path, v in lengths.items()
  }


def rounded_alone(params: Any, layer: QuantizedLayer, bits: int, estimator: str) -> Any:
  """``params`` with only ``layer``'s weights rounded to nearest at ``bits`` (its scale from
  ``estimator``, ``"minmax"`` or ``"mse"``)."""
  spec = dataclasses.replace(layer.weight_spec, bits=bits)
  scale_of = WEIGHT_ESTIMATORS[estimator]
  rounded = jax.vmap(lambda w: fake_quant(w, scale_of(w, spec), spec=spec))(_units(params, layer))
  shape = params_at(params, layer.path)[layer.weight_name].shape
  return with_params_at(params, layer.path, {layer.weight_name: rounded.reshape(shape)})


def sensitivity_importance(
  loss: Callable[[Any], float],
  params: Any,
  layers: Mapping[str, QuantizedLayer],
  probe_bits: int,
  estimator: str,
) -> dict[str, float]:
  """The loss increase (clipped at 0) when each layer alone is rounded to nearest at
  ``probe_bits``; ``loss(params)`` evaluates the float model."""
  base = loss(params)
  return {
    path: max(0.0, loss(rounded_alone(params, layer, probe_bits, estimator)) - base)
    for path, layer in layers.items()
  }


def with_weight_bits(formats: dict, bits: Mapping[str, int]) -> dict:
  """``formats`` (``efqat_jax.nn.formats``) with the weight bits of the layers in ``bits``."""
  return {
    path: {**spec, "weight": {**spec["weight"], "bits": bits[path]}} if path in bits else spec
    for path, spec in formats.items()
  }
