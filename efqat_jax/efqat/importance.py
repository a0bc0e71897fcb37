"""Importance of output channels and layers: the mean absolute weight (EfQAT).

A unit is one quantized layer, or one layer of an ``nn.scan`` / ``nn.vmap`` stack (see
``efqat_jax.nn.quantized_layers``). Its output channels are the weight's ``out_axes`` (one for
Dense and Conv, heads x features for an attention projection, the rows of an embedding table),
flattened in C order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from efqat_jax.nn.layer_table import QuantizedLayer, params_at


def unit_weights(params: Any, layers: Mapping[str, QuantizedLayer]) -> dict[str, jax.Array]:
  """One weight per unit (a stacked weight split into its layers), by unit name."""
  weights = {}
  for layer in layers.values():
    stacked = params_at(params, layer.path)[layer.weight_name]
    for index in layer.indices():
      weights[layer.unit(index)] = stacked[index]
  return weights


def channel_importance(weight: jax.Array, out_axes: tuple[int, ...]) -> jax.Array:
  """Mean |w| of every output channel of one layer's weight, as a flat vector of length C."""
  channels = jnp.moveaxis(weight, out_axes, tuple(range(-len(out_axes), 0)))
  size = channels.shape[channels.ndim - len(out_axes) :]
  return jnp.mean(jnp.abs(channels.reshape(-1, *size)), axis=0).reshape(-1)


def layer_importance(weight: jax.Array) -> jax.Array:
  """Mean |w| of the whole layer."""
  return jnp.mean(jnp.abs(weight))
