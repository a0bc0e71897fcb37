"""Which weights train: a TrainableSet chosen by importance (CWPL, CWPN, LWPN, or the ends).

Modes (``rho`` is the unfrozen fraction; a unit is a layer, or one layer of a stack):
  cwpl  in every unit, the ceil(rho * C) most important output channels;
  cwpn  the ceil(rho * N) most important of all N output channels of the network, ranked
        together, so units get different counts;
  lwpn  the ceil(rho * L) most important of the L units, each trained whole;
  qat   everything (rho is ignored);  ptq  nothing.
What rho counts (``rho_unit``), an open point of the paper:
  blocks  channels (cwpl, cwpn) or units (lwpn), as above;
  params  quantized weights: cwpn and lwpn go through the channels or units in order of
          importance and take each one whose weights still fit in rho of all quantized weights
          (one that does not fit is passed over, and the next ones are tried); if none fits,
          the most important one trains alone. rho then bounds the share of weight gradients
          computed, whatever the sizes of the blocks ranked first (cwpn pays for a layer's
          channels ``bucket`` at a time, so its bucketed counts stay within rho too). cwpl is
          the same in every unit: a layer's channels are equal in size.
  work    weight-gradient multiply-adds: as ``params``, with each weight counted at what its
          gradient costs (``QuantizedLayer.macs_per_weight``: a conv's output pixels, a Dense
          layer's tokens). rho then bounds the share of the weight-gradient work, the part of
          the backward pass that EfQAT saves; a weight of a late, low-resolution conv counts
          less than one of an early conv.
Importance is mean |w| (the paper) or another of ``IMPORTANCES``
(``efqat_jax.efqat.importance``); a unit's is the mean of its channels'.

What else trains (``cheap_params``): the params that are not quantized weights (biases,
normalisation params, activation-quantizer params, unfrozen weight scales) cost O(C) each.
  all_layers       they train in every layer (the paper's reading of "quantization parameters
                   are always trained"); the input gradient then runs down to the first layer;
  selected_layers  they train only in the layers that have selected weights, with the modules
                   attached to them (``efqat_jax.nn.quantized_layers``: a conv's BatchNorm, the
                   embedding before the first layer); one reading of "the quantization
                   parameters are updated only for the non-frozen weights" (arXiv 2411.11038).
                   Nothing below the lowest trainable layer trains, so the backward pass stops
                   there. A stack (``nn.scan``) counts as selected when any of its units is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efqat_jax.efqat.importance import unit_scores
from efqat_jax.nn.layer_table import QuantizedLayer, own_params

MODES = ("cwpl", "cwpn", "lwpn", "qat", "ptq")
CHEAP_PARAMS = ("all_layers", "selected_layers")
RHO_UNITS = ("blocks", "params", "work")


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["channels"],
  meta_fields=["counts", "layers", "train_frozen_scales", "cheap_params"],
)
@dataclasses.dataclass(frozen=True)
class TrainableSet:
  """Per unit: how many output channels train (static) and which (data).

  Attributes:
    counts: ``((unit, k), ...)``, the number of trainable output channels of every unit; static
      under jit, so a new selection with the same counts reuses the compiled step.
    layers: the quantized layers (``efqat_jax.nn.quantized_layers``), sorted by path.
    channels: ``{unit: int32[k]}``, the trainable channels, most important first.
    train_frozen_scales: whether the weight scales of frozen channels train anyway (their
      gradient then needs the layer's full weight gradient).
    cheap_params: where the params other than quantized weights train (``CHEAP_PARAMS``).
  """

  counts: tuple[tuple[str, int], ...]
  layers: tuple[QuantizedLayer, ...]
  channels: dict[str, jax.Array]
  train_frozen_scales: bool = False
  cheap_params: str = "all_layers"

  def count(self, unit: str) -> int:
    return dict(self.counts)[unit]

  def size(self, unit: str) -> int:
    """The unit's number of output channels C."""
    return self._unit_layer()[unit].num_channels

  def channel_mask(self, unit: str) -> jax.Array:
    """Bool ``[C]``: True for the trainable channels of ``unit``."""
    return jnp.zeros(self.size(unit), bool).at[self.channels[unit]].set(True)

  def fractions(self) -> dict[str, float]:
    """Trainable share of output channels per unit (equal to its share of weight params)."""
    return {unit: k / self.size(unit) for unit, k in self.counts}

  def summary(self) -> dict[str, float]:
    """What trains, for logging: per unit the share of channels and of weight params (equal
    within a unit); over the network the share of channels, of weight params and (where the
    layers recorded it) of the weight-gradient work."""
    unit_layer = self._unit_layer()
    sizes = {unit: math.prod(unit_layer[unit].weight_shape) for unit, _ in self.counts}
    channels = {unit: unit_layer[unit].num_channels for unit, _ in self.counts}
    work = {unit: sizes[unit] * unit_layer[unit].macs_per_weight for unit in sizes}
    trained = lambda size: sum(k / channels[u] * size[u] for u, k in self.counts)
    out = {
      "channel_fraction": sum(k for _, k in self.counts) / sum(channels.values()),
      "param_fraction": trained(sizes) / sum(sizes.values()),
    }
    if all(work.values()):
      out["work_fraction"] = trained(work) / sum(work.values())
    for unit, share in self.fractions().items():
      out[f"{unit}/channel_fraction"] = out[f"{unit}/param_fraction"] = share
    return out

  def frozen_layers(self) -> tuple[QuantizedLayer, ...]:
    """The layers none of whose units trains a channel."""
    return tuple(layer for layer in self.layers if not any(self.count(u) for u in layer.units()))

  def frozen_cheap_params(self, params: Any) -> list[tuple[str, ...]]:
    """Flat keys (as ``flax.traverse_util.flatten_dict`` gives them) of the params other than
    quantized weights and their scales that stay frozen: none with ``cheap_params`` =
    ``all_layers``; with ``selected_layers``, those of frozen layers and their attached modules."""
    if self.cheap_params == "all_layers":
      return []
    keys = []
    for layer in self.frozen_layers():
      skip = {layer.weight_name, layer.scale_name}
      for path in (layer.path, *layer.attached):
        prefix = tuple(path.split("/")) if path else ()
        own = own_params(params, path)
        keys += [(*prefix, name) for name in own if path != layer.path or name not in skip]
    return keys

  def _unit_layer(self) -> dict[str, QuantizedLayer]:
    return {unit: layer for layer in self.layers for unit in layer.units()}


def _validate(mode: str, rho: float, bucket: int, cheap_params: str, rho_unit: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if rho_unit not in RHO_UNITS:
    raise ValueError(f"rho_unit must be one of {RHO_UNITS}, got {rho_unit!r}")
  if cheap_params not in CHEAP_PARAMS:
    raise ValueError(f"cheap_params must be one of {CHEAP_PARAMS}, got {cheap_params!r}")
  if not 0.0 <= rho <= 1.0:
    raise ValueError(f"rho must be in [0, 1], got {rho!r}")
  if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
    raise ValueError(f"bucket must be a positive int, got {bucket!r}")


def _bucketed(k: int, size: int, bucket: int) -> int:
  return min(size, -(-k // bucket) * bucket) if k else 0


def weights_per_channel(layers: Mapping[str, QuantizedLayer]) -> dict[str, int]:
  """Per unit, the number of weights of one of its output channels."""
  return {
    unit: math.prod(layer.weight_shape) // layer.num_channels
    for layer in layers.values()
    for unit in layer.units()
  }


def work_per_channel(layers: Mapping[str, QuantizedLayer]) -> dict[str, float]:
  """Per unit, the weight-gradient multiply-adds of one of its output channels."""
  missing = [path for path, layer in layers.items() if layer.macs_per_weight <= 0]
  if missing:
    raise ValueError(
      f"rho_unit='work' needs each layer's macs_per_weight, which quantized_layers records;"
      f" missing for {missing}"
    )
  weights = weights_per_channel(layers)
  return {
    unit: weights[unit] * layer.macs_per_weight
    for layer in layers.values()
    for unit in layer.units()
  }


def _within_budget(
  owners: np.ndarray, cost: np.ndarray, sizes: np.ndarray, bucket: int, rho: float
) -> np.ndarray:
  """Per block (a unit, or for lwpn a whole unit of size 1), how many of its ``sizes`` items
  train when rho counts weights or work: the items, ranked (``owners``: the block of each, most
  important first), are gone through in turn; a block's items are paid for (``cost`` each)
  ``bucket`` at a time (fewer where its size ends), and an item trains if its block has a paid
  slot left or the next bucket still fits in rho of the total. If none fits, the top item's
  bucket trains alone. So the counts are multiples of ``bucket`` (or the block's size) and their
  cost stays within rho."""
  paid = np.zeros(len(sizes), np.int64)
  if rho == 0:
    return paid
  used = np.zeros(len(sizes), np.int64)
  room = rho * float(np.sum(cost * sizes, dtype=np.float64)) * (1 + 1e-9)  # rho = 1 takes all
  for unit in owners:
    if used[unit] == paid[unit]:
      slots = min(bucket, sizes[unit] - paid[unit])
      if slots * cost[unit] > room:
        continue
      room -= slots * cost[unit]
      paid[unit] += slots
    used[unit] += 1
  if not paid.any():
    paid[owners[0]] = min(bucket, sizes[owners[0]])
  return paid


def select(
  params: Any,
  layers: Mapping[str, QuantizedLayer],
  mode: str,
  rho: float = 0.1,
  bucket: int = 1,
  train_frozen_scales: bool = False,
  cheap_params: str = "all_layers",
  importance: str = "mean_abs",
  batch_stats: Any = None,
  rho_unit: str = "blocks",
  reference: Any = None,
) -> TrainableSet:
  """Chooses the trainable output channels of every unit.

  Args:
    params: the model's params.
    layers: its quantized layers, ``efqat_jax.nn.quantized_layers(qmodel, variables, *inputs)``.
    mode: one of ``MODES``.
    rho: the trained fraction, of channels in cwpl, of what ``rho_unit`` counts in cwpn and lwpn.
    bucket: for cwpn, per-unit counts are multiples of ``bucket`` (or C), so that
      re-selections change the static counts, and recompile the step, less often: rounded up
      in blocks, paid for within rho in params and work.
    train_frozen_scales: let the weight scales of frozen channels train.
    cheap_params: where the params other than quantized weights train (see the module doc).
    importance: how channels and units are ranked, one of ``IMPORTANCES``.
    batch_stats: the model's ``batch_stats`` collection (the importances that fold a BatchNorm
      in need it: ``bn_folded``, ``rounding_error``, ``ptq_error``).
    rho_unit: what rho counts, one of ``RHO_UNITS`` (see the module doc).
    reference: the float model's params (``ptq_error`` needs them).

  Returns:
    The TrainableSet.
  """
  _validate(mode, rho, bucket, cheap_params, rho_unit)
  if not layers:
    raise ValueError("layers is empty: the model has no quantized layer, nothing to select")
  layers = dict(sorted(layers.items()))
  scores = unit_scores(params, layers, importance, batch_stats, reference)
  sizes = {unit: s.size for unit, s in scores.items()}
  cost = work_per_channel(layers) if rho_unit == "work" else weights_per_channel(layers)
  if mode == "qat":
    counts = dict(sizes)
  elif mode == "ptq":
    counts = dict.fromkeys(sizes, 0)
  elif mode == "cwpl":
    counts = {unit: math.ceil(rho * c) for unit, c in sizes.items()}
  elif mode == "lwpn":
    ranked = sorted(scores, key=lambda u: -float(np.mean(scores[u])))
    if rho_unit != "blocks":
      whole = np.array([cost[u] * sizes[u] for u in ranked])
      ones = np.ones(len(ranked), np.int64)
      fits = _within_budget(np.arange(len(ranked)), whole, ones, 1, rho)
      chosen = {u for u, fit in zip(ranked, fits, strict=True) if fit}
    else:
      chosen = set(ranked[: math.ceil(rho * len(ranked))])
    counts = {unit: sizes[unit] if unit in chosen else 0 for unit in sizes}
  else:  # cwpn
    pooled = np.concatenate(list(scores.values()))
    order = np.argsort(-pooled, kind="stable")
    if rho_unit != "blocks":
      # a unit's channels weigh the same, so the ones that fit are its most important ones
      owner = np.concatenate([np.full(sizes[u], i) for i, u in enumerate(scores)])
      units = list(scores)
      taken = _within_budget(
        owner[order],
        np.array([cost[u] for u in units]),
        np.array([sizes[u] for u in units]),
        bucket,
        rho,
      )
      counts = {unit: int(n) for unit, n in zip(units, taken, strict=True)}
    else:
      k = math.ceil(rho * len(pooled))
      threshold = pooled[order[k - 1]] if k else np.inf
      counts = {unit: int(np.sum(s >= threshold)) for unit, s in scores.items()}
      counts = {unit: _bucketed(k, sizes[unit], bucket) for unit, k in counts.items()}
  channels = {
    unit: jnp.asarray(np.argsort(-scores[unit], kind="stable")[: counts[unit]], jnp.int32)
    for unit in sizes
  }
  return TrainableSet(
    tuple(sorted(counts.items())),
    tuple(layers.values()),
    channels,
    train_frozen_scales,
    cheap_params,
  )
