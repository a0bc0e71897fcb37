"""Post-training quantization: calibration, capture, and the registry of PTQ methods (``rtn``
first, then the layer-wise ``optq``, ``gpfq``, ``axe_optq``, ``axe_gpfq``, then
``attention_round``), and the per-layer bit allocation of mixed precision."""

# Registration order is the order the methods are listed in (rtn, the default, first).
# isort: off
from efqat_jax.ptq import rtn, layerwise, attention_round  # noqa: F401

# isort: on
from efqat_jax.ptq.calibrate import calibrate, split_calibration_stats
from efqat_jax.ptq.capture import statistics_capture
from efqat_jax.ptq.methods import PTQ_METHODS, PtqMethod, quantize_weights
from efqat_jax.ptq.rtn import round_to_nearest_weights

__all__ = [
  "PTQ_METHODS",
  "PtqMethod",
  "calibrate",
  "quantize_weights",
  "round_to_nearest_weights",
  "split_calibration_stats",
  "statistics_capture",
]
