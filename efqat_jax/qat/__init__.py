"""Constraints and losses that quantization-aware training plugs into the generic train step."""

from efqat_jax.qat.accumulator_projection import project_params, project_weight

__all__ = ["project_params", "project_weight"]
