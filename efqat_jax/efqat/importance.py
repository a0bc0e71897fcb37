"""Importance of output channels and layers: the mean absolute weight (EfQAT).

A layer is a quantized kernel, recognised by its ``kernel_scale`` sibling. Its output channels
are the axes its per-channel ``kernel_scale`` spans (the trailing axes of the kernel: one for
Dense and Conv, e.g. heads x head_dim for an attention projection), flattened in C order.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

from efqat_jax.nn.export import params_at


def quantized_kernels(params: Any) -> dict[str, jax.Array]:
  """The kernels of the quantized layers (those with a ``kernel_scale``), by ``/``-joined path."""
  flat = flatten_dict(params)
  return {
    "/".join(path[:-1]): value
    for path, value in flat.items()
    if path[-1] == "kernel" and path[:-1] + ("kernel_scale",) in flat
  }


def output_axes(params: Any, path: str) -> int:
  """How many trailing kernel axes are output channels (at least 1)."""
  return max(1, jnp.ndim(params_at(params, path)["kernel_scale"]))


def channel_importance(kernel: jax.Array, num_output_axes: int = 1) -> jax.Array:
  """Mean |w| of every output channel, as a flat vector of length C."""
  channels = kernel.reshape(-1, *kernel.shape[kernel.ndim - num_output_axes :])
  return jnp.mean(jnp.abs(channels), axis=0).reshape(-1)


def layer_importance(kernel: jax.Array) -> jax.Array:
  """Mean |w| of the whole layer."""
  return jnp.mean(jnp.abs(kernel))
