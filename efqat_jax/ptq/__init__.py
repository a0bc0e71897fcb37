"""Post-training quantization: calibration, and the registry of PTQ methods (``rtn`` first)."""

from efqat_jax.ptq import rtn  # noqa: F401 (registers "rtn")
from efqat_jax.ptq.calibrate import calibrate, split_calibration_stats
from efqat_jax.ptq.methods import PTQ_METHODS, PtqMethod, quantize_weights
from efqat_jax.ptq.rtn import round_to_nearest_weights

__all__ = [
  "PTQ_METHODS",
  "PtqMethod",
  "calibrate",
  "quantize_weights",
  "round_to_nearest_weights",
  "split_calibration_stats",
]
