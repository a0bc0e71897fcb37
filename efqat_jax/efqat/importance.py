"""Importance of output channels and layers, gradient-free (EfQAT ranks by it).

A unit is one quantized layer, or one layer of an ``nn.scan`` / ``nn.vmap`` stack (see
``efqat_jax.nn.quantized_layers``). Its output channels are the weight's ``out_axes`` (one for
Dense and Conv, heads x features for an attention projection, the rows of an embedding table),
flattened in C order. A channel's score is one of ``IMPORTANCES``:

  mean_abs   mean |w| over the channel's weights (arXiv 2411.11038). Comparable within a layer;
             across layers it favours the layers with small fan-in, whose weights are large
             by initialisation (He / LeCun init draws them with std ~ 1/sqrt(fan_in)).
  fan_in     mean |w| * sqrt(fan_in): the magnitude relative to the layer's init scale, so
             layers of different widths are ranked on one scale (per-layer normalised).
  bn_folded  mean |w| * |gamma| / sqrt(var + eps) of the BatchNorm that follows the layer
             (its attached norm, with running ``batch_stats``): the magnitude of the weight
             the norm folds into at inference. A BatchNorm makes its conv's weight scale
             arbitrary; folding removes that freedom. Layers without one keep mean |w|.

A unit's (layer's) score is the mean of its channel scores; with ``mean_abs`` that is the mean
|w| of the whole layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from efqat_jax.nn.layer_table import QuantizedLayer, own_params, params_at

IMPORTANCES = ("mean_abs", "fan_in", "bn_folded")
BATCH_NORM_EPSILON = 1e-5  # flax.linen.BatchNorm's default


def unit_weights(params: Any, layers: Mapping[str, QuantizedLayer]) -> dict[str, jax.Array]:
  """One weight per unit (a stacked weight split into its layers), by unit name."""
  weights = {}
  for layer in layers.values():
    stacked = params_at(params, layer.path)[layer.weight_name]
    for index in layer.indices():
      weights[layer.unit(index)] = stacked[index]
  return weights


def channel_importance(weight: Any, out_axes: tuple[int, ...]) -> np.ndarray:
  """Mean |w| of every output channel of one layer's weight, as a flat vector of length C.

  Computed on the host with NumPy: selection ranks a few small vectors per layer, where eager
  JAX ops would each dispatch (and compile once per shape)."""
  weight = np.asarray(weight)
  channels = np.moveaxis(weight, out_axes, tuple(range(-len(out_axes), 0)))
  size = channels.shape[channels.ndim - len(out_axes) :]
  return np.mean(np.abs(channels.reshape(-1, *size)), axis=0).reshape(-1)


def unit_scores(
  params: Any,
  layers: Mapping[str, QuantizedLayer],
  importance: str = "mean_abs",
  batch_stats: Any = None,
) -> dict[str, np.ndarray]:
  """Per unit, the score of each of its output channels (``float[C]``, see the module doc).

  Args:
    params: the model's params.
    layers: its quantized layers.
    importance: one of ``IMPORTANCES``.
    batch_stats: the model's ``batch_stats`` collection; required by ``bn_folded``.
  """
  if importance not in IMPORTANCES:
    raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
  if importance == "bn_folded" and batch_stats is None:
    raise ValueError(
      "importance='bn_folded' needs the model's batch_stats (pass batch_stats=variables"
      "['batch_stats'], or {} for a model without BatchNorm)"
    )
  scores = {}
  for layer in layers.values():
    weight = np.asarray(params_at(params, layer.path)[layer.weight_name])
    fold = _folding_norm(layer, params, batch_stats) if importance == "bn_folded" else None
    for index in layer.indices():
      score = channel_importance(weight[index], layer.out_axes)
      if importance == "fan_in":
        score = score * math.sqrt(math.prod(layer.weight_shape) / layer.num_channels)
      elif fold is not None:
        gamma, var = fold
        score = score * np.abs(gamma[index]) / np.sqrt(var[index] + BATCH_NORM_EPSILON)
      scores[layer.unit(index)] = score
  return scores


def _folding_norm(
  layer: QuantizedLayer, params: Any, batch_stats: Any
) -> tuple[np.ndarray, np.ndarray] | None:
  """``(gamma, var)`` of the first BatchNorm attached to ``layer`` over its output channels
  (stacked like the layer), or None. A norm without a scale folds with gamma = 1."""
  shape = (*layer.stack_shape, layer.num_channels)
  for path in layer.attached:
    try:
      var = np.asarray(params_at(batch_stats, path)["var"])
    except (KeyError, TypeError):
      continue
    if var.shape == shape:
      gamma = own_params(params, path).get("scale")
      return (np.ones(shape) if gamma is None else np.asarray(gamma)), var
  return None
