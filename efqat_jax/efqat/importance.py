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
  ptq_error  sqrt(sum_j (v_j - Q(w_j))^2), folded like rounding_error, where v is the float
             model's weight (``reference``): on a PTQ model, the output error PTQ left in the
             channel (rounding, and what OPTQ, GPFQ or AXE moved to compensate); at a later
             re-selection, how far the channel's quantized weights are from the float ones.
             Not in the paper; it needs the float model's params.

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

IMPORTANCES = ("mean_abs", "fan_in", "bn_folded", "rounding_error", "ptq_error")
FOLDED = ("bn_folded", "rounding_error", "ptq_error")  # they fold a following BatchNorm in
ERRORS = ("rounding_error", "ptq_error")  # they score the error of the quantized weights
NEEDS_REFERENCE = ("ptq_error",)  # they need the float model's params
ALL_ZERO = {  # why an error importance can score every channel 0
  "rounding_error": "every weight lies on its grid, as PTQ writes them",
  "ptq_error": "the quantized weights equal the reference's: is reference the float model's?",
}
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


def quantized_weight(weight: Any, scale: Any, spec: QuantSpec) -> np.ndarray:
  """Q(w) on the host: ``weight`` rounded to nearest on the grid of ``spec`` with step ``scale``
  (symmetric weights), clipped to its range, as the layer's weight quantizer gives it."""
  weight = np.asarray(weight, np.float32)
  blocks = granularity.to_blocks(weight, spec)
  scale = np.maximum(np.abs(np.asarray(scale, np.float32)), MIN_SCALE)  # as layers read it
  step = np.asarray(granularity.expand_param(scale, spec, weight.shape))
  return (np.clip(np.round(blocks / step), spec.qmin, spec.qmax) * step).reshape(weight.shape)


def channel_error_norm(error: Any, out_axes: tuple[int, ...]) -> np.ndarray:
  """sqrt(sum_j error_j^2) over every output channel of a weight-shaped error (flat, length C)."""
  error = np.asarray(error, np.float32)
  return np.sqrt(channel_importance(np.square(error), out_axes) * _fan_in(error.shape, out_axes))


def _fan_in(shape: tuple[int, ...], out_axes: tuple[int, ...]) -> int:
  """Weights per output channel."""
  return math.prod(shape) // math.prod(shape[a] for a in out_axes)


def unit_scores(
  params: Any,
  layers: Mapping[str, QuantizedLayer],
  importance: str = "mean_abs",
  batch_stats: Any = None,
  reference: Any = None,
) -> dict[str, np.ndarray]:
  """Per unit, the score of each of its output channels (``float[C]``, see the module doc).

  Args:
    params: the model's params.
    layers: its quantized layers.
    importance: one of ``IMPORTANCES``.
    batch_stats: the model's ``batch_stats`` collection; required by the ``FOLDED`` ones.
    reference: the float model's params (its weights at the same paths); required by
      ``ptq_error``.

  Raises:
    ValueError: for an unknown importance, a folding one without ``batch_stats``, ``ptq_error``
      without a ``reference`` of the model's weight shapes, or an error importance under
      which every channel scores 0 (nothing to rank by).
  """
  if importance not in IMPORTANCES:
    raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
  if importance in FOLDED and batch_stats is None:
    raise ValueError(
      f"importance={importance!r} needs the model's batch_stats (pass batch_stats=variables"
      "['batch_stats'], or {} for a model without BatchNorm)"
    )
  if importance in NEEDS_REFERENCE and reference is None:
    raise ValueError(
      f"importance={importance!r} needs the float model's params (pass reference=fp_params)"
    )
  scores = _scores(params, layers, importance, batch_stats, reference)
  if importance in ERRORS and not any(np.any(s) for s in scores.values()):
    raise ValueError(
      f"importance={importance!r}: every channel scores 0 ({ALL_ZERO[importance]}), nothing to"
      " rank by; rank by 'bn_folded' or 'mean_abs'"
    )
  return scores


def _scores(
  params: Any,
  layers: Mapping[str, QuantizedLayer],
  importance: str,
  batch_stats: Any,
  reference: Any,
) -> dict[str, np.ndarray]:
  scores = {}
  for layer in layers.values():
    own = params_at(params, layer.path)
    weight = np.asarray(own[layer.weight_name])
    if importance in ERRORS:  # error = target - Q(w): from w itself, or from the float model
      scale = np.asarray(own[layer.scale_name])
      target = weight if importance == "rounding_error" else _reference_weight(reference, layer)
    fold = _folding_norm(layer, params, batch_stats) if importance in FOLDED else None
    for index in layer.indices():
      if importance in ERRORS:
        quantized = quantized_weight(weight[index], scale[index], layer.weight_spec)
        score = channel_error_norm(target[index] - quantized, layer.out_axes)
      else:
        score = channel_importance(weight[index], layer.out_axes)
      if importance == "fan_in":
        score = score * math.sqrt(_fan_in(layer.weight_shape, layer.out_axes))
      elif fold is not None:
        gamma, var = fold
        score = score * np.abs(gamma[index]) / np.sqrt(var[index] + BATCH_NORM_EPSILON)
      scores[layer.unit(index)] = score
  return scores


def _reference_weight(reference: Any, layer: QuantizedLayer) -> np.ndarray:
  """The float model's weight of ``layer``, checked against the layer's shape."""
  try:
    weight = np.asarray(params_at(reference, layer.path)[layer.weight_name])
  except (KeyError, TypeError):
    raise ValueError(
      f"reference has no {layer.path}/{layer.weight_name}: pass the float model's params"
    ) from None
  shape = (*layer.stack_shape, *layer.weight_shape)
  if weight.shape != shape:
    raise ValueError(
      f"reference {layer.path}/{layer.weight_name} has shape {weight.shape}, the model's is "
      f"{shape}: pass the float model's params"
    )
  return weight


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
