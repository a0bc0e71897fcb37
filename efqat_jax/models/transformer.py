"""A small pre-LayerNorm Transformer: a causal decoder for language modelling, or an encoder
with a classification head, written with plain Flax layers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class TransformerBlock(nn.Module):
  """Pre-LN block: x + attention(LN(x)), then x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int
  causal: bool
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32)) if self.causal else None
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(h, h, mask=mask)
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    h = nn.LayerNorm()(x)
    h = nn.Dense(self.mlp_dim)(h)
    h = nn.Dense(x.shape[-1])(nn.gelu(h))
    return x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)


class Transformer(nn.Module):
  """Token embedding + learned positions, pre-LN blocks, final LN and a Dense head.

  Attributes:
    vocab_size: number of input tokens.
    d_model: width of the residual stream.
    num_heads: attention heads per block.
    num_layers: blocks.
    mlp_dim: hidden width of each block's MLP.
    max_len: longest sequence (size of the position table).
    causal: True for a decoder (per-position next-token logits over the vocabulary); False for
      an encoder whose mean-pooled output feeds a ``num_classes`` classifier.
    num_classes: classes of the encoder head (ignored when causal).
    dropout_rate: dropout after attention and MLP, active when ``train`` is True.
  """

  vocab_size: int = 128
  d_model: int = 128
  num_heads: int = 4
  num_layers: int = 2
  mlp_dim: int = 512
  max_len: int = 256
  causal: bool = True
  num_classes: int = 2
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    if tokens.shape[1] > self.max_len:
      raise ValueError(
        f"sequence length {tokens.shape[1]} exceeds Transformer.max_len={self.max_len}"
      )
    x = nn.Embed(self.vocab_size, self.d_model)(tokens)
    positions = self.param("positions", nn.initializers.normal(0.02), (self.max_len, self.d_model))
    x = x + positions[: tokens.shape[1]]
    for _ in range(self.num_layers):
      x = TransformerBlock(self.num_heads, self.mlp_dim, self.causal, self.dropout_rate)(x, train)
    x = nn.LayerNorm()(x)
    if self.causal:
      return nn.Dense(self.vocab_size)(x)
    return nn.Dense(self.num_classes)(x.mean(axis=1))
