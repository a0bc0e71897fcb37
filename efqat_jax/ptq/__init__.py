"""Post-training quantization."""

from efqat_jax.ptq.calibrate import calibrate, split_calibration_stats

__all__ = ["calibrate", "split_calibration_stats"]
