"""The pipeline's default config; files in configs/ start from ``base_config()``.

Every field, its default and meaning: ``python -m efqat_jax.main --fields``.
"""

from efqat_jax.pipeline.schema import base_config

__all__ = ["base_config"]
