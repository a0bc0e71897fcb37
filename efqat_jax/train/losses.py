"""Losses and metrics with example masks (padded batches count only their real examples)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean of ``values`` over entries where ``mask`` is true (all entries if None)."""
  if mask is None:
    return jnp.mean(values)
  mask = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim)), values.shape)
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross-entropy with integer labels; works per example and per token."""
  return masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), mask)


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Share of (unmasked) predictions equal to the label."""
  return masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask)


# ``apply(*args, **kwargs)`` runs ``model.apply(variables, *args, **kwargs)`` with the step's
# variables (in the train step: with the state's collections other than ``quant_stats`` mutable).
Apply = Callable[..., Any]
# ``loss_fn(apply, batch, rng, train) -> (loss, metrics)``: how a batch becomes a scalar loss and
# a dict of scalar metrics. ``rng`` is the step's key in training and None in evaluation.
LossFn = Callable[[Apply, Mapping[str, Any], Any, bool], tuple[jax.Array, dict[str, Any]]]


def classification_loss(
  apply: Apply, batch: Mapping[str, jax.Array], rng: jax.Array | None, train: bool
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy of ``apply(batch["inputs"], train=train)`` against ``batch["labels"]``.

  For models called as ``model(inputs, train=...)`` with dropout rng ``"dropout"``; works per
  example (classification) and per token (next-token prediction). ``batch["mask"]``, when
  present, marks the real examples of a padded batch.

  Args:
    apply: runs the model with the step's variables.
    batch: ``"inputs"``, integer ``"labels"`` and an optional boolean ``"mask"``.
    rng: the dropout key (None: no dropout rng, as in evaluation).
    train: passed to the model as ``train=``.

  Returns:
    ``(loss, {"accuracy": accuracy})``.
  """
  logits = apply(batch["inputs"], train=train, rngs={"dropout": rng} if rng is not None else None)
  mask = batch.get("mask")
  return cross_entropy(logits, batch["labels"], mask), {
    "accuracy": accuracy(logits, batch["labels"], mask)
  }
