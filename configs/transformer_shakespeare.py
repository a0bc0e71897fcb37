"""Pre-LN Transformer character LM on shakespeare_char (64-byte windows), W4A4; the first
attention projections and the output head at 8 bits."""

from efqat_jax.config import base_config


def get_config():
  config = base_config()
  config.dataset = "shakespeare_char/seq64"
  config.eval_split = "validation"
  config.task = "lm"
  config.model = "transformer"
  config.model_kwargs.update(
    dict(vocab_size=256, d_model=128, num_heads=4, num_layers=2, mlp_dim=512, max_len=64)
  )
  config.batch_size = 32
  config.eval_batch_size = 256
  config.fp.update(steps=1500, learning_rate=2e-3, weight_decay=0.0)
  # QAT's and EfQAT's peak rate, 4x the former 5e-4: of 1x-8x, the rate at or within the spread
  # of the best for QAT and every EfQAT mode, 3 seeds at W4A4 (bench/README.md, EfQAT learning rate)
  config.qat.update(steps=500, learning_rate=2e-3)
  config.efqat.update(steps=500, learning_rate=2e-3)
  config.quant.high_precision_layers = (
    "TransformerBlock_0/MultiHeadDotProductAttention_0/(query|key|value)|Dense_0"
  )
  config.block_replacement.boundaries = "TransformerBlock_1"  # its two layers
  return config
