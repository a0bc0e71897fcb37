"""The pipeline's config schema with its defaults; files in configs/ start from it."""

from __future__ import annotations

import ml_collections


def _optimizer(type_safe: bool = True, **overrides) -> ml_collections.ConfigDict:
  fields = dict(
    steps=300,
    learning_rate=1e-3,
    optimizer="adamw",  # or "sgd" (momentum 0.9)
    weight_decay=0.0,
    warmup_steps=20,
    quant_lr_multiplier=0.01,  # learning-rate factor of scales and zero points
  )
  return ml_collections.ConfigDict(fields | overrides, type_safe=type_safe)


def base_config() -> ml_collections.ConfigDict:
  """Every field the pipeline reads (see ``efqat_jax.stages.validate`` for allowed values)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.stages = "fp,ptq,qat,efqat,export"
  config.dataset = "mnist5k"  # bundled: mnist5k, digits, shakespeare_char[/seq64]
  config.data_dir = ""  # "": <workdir>/data
  config.train_split = "train"
  config.eval_split = "test"
  config.task = "classification"  # or "lm" (next-token prediction on "tokens")
  config.model = "cnn"  # cnn, resnet, mobilenet, transformer
  config.model_kwargs = ml_collections.ConfigDict(type_safe=False)
  config.batch_size = 64
  config.eval_batch_size = 200
  config.log_every = 10
  config.checkpoint_every = 100
  config.progress = True
  config.fp = _optimizer(steps=600, learning_rate=3e-3, weight_decay=1e-4, warmup_steps=50)
  config.quant = ml_collections.ConfigDict(
    dict(
      weight_bits=4,
      act_bits=4,
      high_precision_bits=8,
      high_precision_layers="auto",  # "auto": first and last layer; "": none; or a regex
      weight_estimator="mse",  # kernel ranges at calibration: "mse" or "minmax"
      quantize_embeddings=False,  # True: nn.Embed tables per row at weight_bits (else float)
    )
  )
  config.ptq = ml_collections.ConfigDict(dict(calibration_batches=8))
  config.qat = _optimizer()
  config.efqat = _optimizer(
    type_safe=False,  # reselect_every takes an int or "never"
    mode="cwpl",  # cwpl, cwpn, lwpn, or the ends qat / ptq (efqat_jax.efqat.select)
    rho=0.1,  # fraction of output channels (cwpl, cwpn) or of layers (lwpn) that train
    reselect_every=100,  # steps between importance re-rankings; "never" or 0: rank once
    bucket=4,  # cwpn: per-layer counts rounded up to a multiple (fewer recompiles)
    train_frozen_scales=False,  # True: frozen channels' weight scales train (full dW cost)
  )
  return config
