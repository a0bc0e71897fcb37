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
  rounding_error
             sqrt(sum_j (w_j - Q(w_j))^2) over the channel's weights, Q the channel's current
             weight quantizer (its format and scale), times the following BatchNorm's
             |gamma| / sqrt(var + eps) where one follows: the standard deviation of the error
             that rounding adds to the channel's output for unit-variance, uncorrelated inputs
             (after the norm); not in the paper. It needs weights off their grid (a float or
             QAT-trained model's latent weights). Every PTQ method here, round-to-nearest
             included, writes each weight onto its grid, so on a PTQ model every channel
             scores 0 and ``unit_scores`` refuses it; where training has moved only the
             selected channels, it scores only those. So the pipeline, which ranks the PTQ
             model, does not offer it.

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
from efqat_jax.quant import granularity
from efqat_jax.quant.fake_quant import MIN_SCALE
from efqat_jax.quant.spec import QuantSpec

IMPORTANCES = ("mean_abs", "fan_in", "bn_folded", "rounding_error")
FOLDED = ("bn_folded", "rounding_error")  # the importances that fold a following BatchNorm in
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


def channel_rounding_error(
  weight: Any, scale: Any, spec: QuantSpec, out_axes: tuple[int, ...]
) -> np.ndarray:
  """sqrt(sum (w - Q(w))^2) over every output channel of one layer's weight (flat, length C),
  Q rounding to nearest on the grid of ``spec`` with step ``scale`` (symmetric weights)."""
  weight = np.asarray(weight, np.float32)
  blocks = granularity.to_blocks(weight, spec)
  scale = np.maximum(np.abs(np.asarray(scale, np.float32)), MIN_SCALE)  # as layers read it
  step = np.asarray(granularity.expand_param(scale, spec, weight.shape))
  rounded = np.clip(np.round(blocks / step), spec.qmin, spec.qmax) * step
  error = (blocks - rounded).reshape(weight.shape)
  return np.sqrt(channel_importance(np.square(error), out_axes) * _fan_in(weight.shape, out_axes))


def _fan_in(shape: tuple[int, ...], out_axes: tuple[int, ...]) -> int:
  """Weights per output channel."""
  return math.prod(shape) // math.prod(shape[a] for a in out_axes)


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
    batch_stats: the model's ``batch_stats`` collection; required by ``bn_folded`` and
      ``rounding_error``.

  Raises:
    ValueError: for an unknown importance, a folding one without ``batch_stats``, or
      ``rounding_error`` where every weight lies on its grid.
  """
  if importance not in IMPORTANCES:
    raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
  if importance in FOLDED and batch_stats is None:
    raise ValueError(
      f"importance={importance!r} needs the model's batch_stats (pass batch_stats=variables"
      "['batch_stats'], or {} for a model without BatchNorm)"
    )
  scores = _scores(params, layers, importance, batch_stats)
  if importance == "rounding_error" and not any(np.any(s) for s in scores.values()):
    raise ValueError(
      "importance='rounding_error': every weight lies on its grid (as PTQ writes them), so"
      " every channel scores 0; rank by 'bn_folded' or 'mean_abs'"
    )
  return scores


def _scores(
  params: Any, layers: Mapping[str, QuantizedLayer], importance: str, batch_stats: Any
) -> dict[str, np.ndarray]:
  scores = {}
  for layer in layers.values():
    own = params_at(params, layer.path)
    weight = np.asarray(own[layer.weight_name])
    scale = np.asarray(own[layer.scale_name]) if importance == "rounding_error" else None
    fold = _folding_norm(layer, params, batch_stats) if importance in FOLDED else None
    for index in layer.indices():
      if importance == "rounding_error":
        score = channel_rounding_error(
          weight[index], scale[index], layer.weight_spec, layer.out_axes
        )
      else:
        score = channel_importance(weight[index], layer.out_axes)
      if importance == "fan_in":
        score = score * math.sqrt(_fan_in(layer.weight_shape, layer.out_axes))
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
