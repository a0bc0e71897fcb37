"""Losses and metrics with example masks (padded batches count only their real examples)."""

from __future__ import annotations

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
