"""Round-to-nearest PTQ: each weight to the nearest level of its calibrated grid."""

from __future__ import annotations

from efqat_jax.ptq.methods import PTQ_METHODS, PtqMethod
from efqat_jax.quant.fake_quant import fake_quant


def round_to_nearest_weights(weight, scale, layer, statistics, settings):
  """``weight`` rounded to the nearest level of the grid ``scale * [qmin, qmax]``."""
  del statistics, settings  # round-to-nearest looks at nothing but the weight and its grid
  return fake_quant(weight, scale, spec=layer.weight_spec)


RTN = PTQ_METHODS.register(
  "rtn", PtqMethod(round_to_nearest_weights, summary="round every weight to the nearest grid level")
)
