"""Small CNN on mnist5k (5,000 real MNIST digits), W4A4 with first and last layer at 8 bits.

The default of ``python -m efqat_jax.main``: under a minute on 2 CPU cores.
"""

from efqat_jax.config import base_config


def get_config():
  config = base_config()
  config.model = "cnn"
  config.model_kwargs.update({"num_classes": 10, "features": (16, 32, 32), "hidden": 128})
  # QAT's and EfQAT's peak rate, 4x the former 1e-3: of 1x-8x, the rate at or within the spread
  # of the best for QAT and every EfQAT mode, 3 seeds at W2A2 (bench/README.md, EfQAT learning rate)
  config.qat.update(learning_rate=4e-3)
  config.efqat.update(learning_rate=4e-3)
  return config
