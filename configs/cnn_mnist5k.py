"""Small CNN on mnist5k (5,000 real MNIST digits), W4A4 with first and last layer at 8 bits.

The default of ``python -m efqat_jax.main``: under a minute on 2 CPU cores.
"""

from efqat_jax.config import base_config


def get_config():
  config = base_config()
  config.model = "cnn"
  config.model_kwargs.update({"num_classes": 10, "features": (16, 32, 32), "hidden": 128})
  return config
