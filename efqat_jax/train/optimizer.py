"""Optimizers for quantized models: quantization params get their own, gentler optimizer.

Quantization params (``kernel_scale``, ``input_scale``, ``input_zero_point``) sit next to the
weights in the params tree. Adam moves every param by about the learning rate per step, which
for a scale of 0.01 would flip its sign within a few steps, so they train at a fraction of the
weights' learning rate and without weight decay.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax

from efqat_jax.nn.ops import QUANT_PARAM_NAMES

OPTIMIZERS = ("adamw", "sgd")
SGD_MOMENTUM = 0.9


def param_labels(params: Any) -> Any:
  """``"quant"`` for each quantization param of ``params`` (by name), ``"weights"`` for the rest."""

  def label(path, _):
    name = getattr(path[-1], "key", None) if path else None
    return "quant" if name in QUANT_PARAM_NAMES else "weights"

  return jax.tree_util.tree_map_with_path(label, params)


def quant_aware(
  weights_tx: optax.GradientTransformation, quant_tx: optax.GradientTransformation
) -> optax.GradientTransformation:
  """One optimizer that updates quantization params with ``quant_tx``, the rest with
  ``weights_tx``.

  Args:
    weights_tx: the optimizer of weights, biases, normalisation params.
    quant_tx: the optimizer of the params named in ``efqat_jax.nn.ops.QUANT_PARAM_NAMES``.

  Returns:
    An ``optax.multi_transform`` over the labels of ``param_labels``.
  """
  return optax.multi_transform({"weights": weights_tx, "quant": quant_tx}, param_labels)


def _fail(name: str, value: Any, allowed: str) -> None:
  raise ValueError(f"make_optimizer: {name} = {value!r} is not allowed: {allowed}")


def _check_int(name: str, value: Any) -> None:
  """Raises unless ``value`` is an int >= 0."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    _fail(name, value, "an integer >= 0")


def _check_number(name: str, value: Any, *, positive: bool = False) -> None:
  """Raises unless ``value`` is a finite number >= 0 (> 0 if ``positive``)."""
  number = isinstance(value, int | float) and not isinstance(value, bool)
  if not number or not math.isfinite(value) or value < 0 or (positive and value == 0):
    _fail(name, value, f"a finite number {'> 0' if positive else '>= 0'}")


def make_optimizer(
  name: str = "adamw",
  *,
  learning_rate: float,
  steps: int,
  warmup_steps: int = 0,
  weight_decay: float = 0.0,
  quant_lr_multiplier: float = 0.01,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (or SGD with momentum 0.9) with linear warm-up and cosine decay to zero.

  Weights follow the schedule with decoupled (AdamW) or L2 (SGD) ``weight_decay``;
  quantization params follow the schedule times ``quant_lr_multiplier``, with no weight decay.

  Example:
    >>> tx, schedule = make_optimizer("sgd", learning_rate=0.1, steps=1000, warmup_steps=50)

  Args:
    name: ``"adamw"`` or ``"sgd"``.
    learning_rate: the peak learning rate (> 0).
    steps: total training steps (>= 0): the length of warm-up plus decay.
    warmup_steps: steps of linear warm-up from 0 (>= 0; capped at ``steps - 1``).
    weight_decay: weight decay of the weights (>= 0).
    quant_lr_multiplier: the quantization params' learning rate as a share of the weights' (>= 0).

  Returns:
    ``(tx, schedule)``: the optimizer and the weights' learning-rate schedule (for logging).

  Raises:
    ValueError: naming the first argument outside its allowed values.
  """
  if name not in OPTIMIZERS:
    _fail("name", name, f"one of {OPTIMIZERS}")
  _check_number("learning_rate", learning_rate, positive=True)
  _check_int("steps", steps)
  _check_int("warmup_steps", warmup_steps)
  _check_number("weight_decay", weight_decay)
  _check_number("quant_lr_multiplier", quant_lr_multiplier)

  warmup = min(warmup_steps, max(steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, learning_rate, warmup_steps=warmup, decay_steps=max(steps, warmup + 1)
  )

  def make(lr, decay):
    if name == "sgd":
      return optax.chain(optax.add_decayed_weights(decay), optax.sgd(lr, SGD_MOMENTUM))
    return optax.adamw(lr, weight_decay=decay)

  quant_schedule = lambda step: schedule(step) * quant_lr_multiplier
  tx = quant_aware(make(schedule, weight_decay), make(quant_schedule, 0.0))
  return tx, schedule
