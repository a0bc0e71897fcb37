"""Post-training quantization."""

from efqat_jax.ptq.calibrate import calibrate, calibrated_params

__all__ = ["calibrate", "calibrated_params"]
