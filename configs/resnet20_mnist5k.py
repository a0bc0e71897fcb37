"""ResNet-20 (CIFAR-style, 0.27 M params) on mnist5k, W4A4 with first and last layer at 8 bits."""

from efqat_jax.config import base_config


def get_config():
  config = base_config()
  config.model = "resnet"
  config.model_kwargs.update({"num_classes": 10, "depth": 20})
  config.fp.update(steps=800, learning_rate=2e-3)
  # QAT's and EfQAT's peak rate, 4x the former 1e-3: of 1x-8x, the rate at or within the spread
  # of the best for QAT and every EfQAT mode, 3 seeds at W2A2 (bench/README.md, EfQAT learning rate)
  config.qat.update(steps=300, learning_rate=4e-3)
  config.efqat.update(steps=300, learning_rate=4e-3)
  config.block_replacement.boundaries = "BasicBlock_3,BasicBlock_6"  # its three stages
  return config
