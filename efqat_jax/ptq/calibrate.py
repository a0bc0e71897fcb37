"""Post-training calibration: run batches in Mode.CALIBRATE, install the ranges (RTN baseline).

With the calibrated scales installed, the quantized model rounds every weight and activation
to the nearest level of its grid: round-to-nearest PTQ, the baseline the layer-wise methods
improve on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
from flax.traverse_util import flatten_dict, unflatten_dict

from efqat_jax.nn.export import with_mode
from efqat_jax.nn.ops import QUANT_PARAM_NAMES, QUANT_STATS, Mode


def calibrated_params(params: Any, quant_stats: Any) -> Any:
  """``params`` with every scale and zero point replaced by its calibrated value."""
  flat_params = flatten_dict(params)
  for path, value in flatten_dict(quant_stats).items():
    if path[-1] in QUANT_PARAM_NAMES and path in flat_params:
      flat_params[path] = value.astype(flat_params[path].dtype)
  return unflatten_dict(flat_params)


def calibrate(
  model: nn.Module,
  variables: dict[str, Any],
  batches: Iterable[Any],
  num_batches: int,
  **apply_kwargs,
) -> dict[str, Any]:
  """Folds ``num_batches`` input batches into the ranges and installs them in the params.

  Args:
    model: a QuantizedModel (or any model with a ``mode`` field).
    variables: its variables; the running ranges start empty (``quant_stats`` is reset).
    batches: an iterable of model inputs.
    num_batches: how many to use (at least 1; fewer if the iterable ends first).
    **apply_kwargs: extra keyword arguments of ``model.apply`` (e.g. ``train=False``).

  Returns:
    The variables with calibrated params and the final running ranges in ``quant_stats``.
  """
  if num_batches < 1:
    raise ValueError(f"num_batches must be >= 1, got {num_batches}")
  calibrating = with_mode(model, Mode.CALIBRATE)

  @jax.jit
  def observe(variables, inputs):
    _, state = calibrating.apply(variables, inputs, mutable=[QUANT_STATS], **apply_kwargs)
    return {**variables, **state}

  empty = jax.tree.map(lambda v: v * 0, variables.get(QUANT_STATS, {}))
  variables = {**variables, QUANT_STATS: empty}
  seen = 0
  for inputs in batches:
    if seen == num_batches:
      break
    variables = observe(variables, inputs)
    seen += 1
  if seen == 0:
    raise ValueError("calibrate got no batches")
  stats = flatten_dict(variables[QUANT_STATS])
  running = unflatten_dict({k: v for k, v in stats.items() if k[-1] not in QUANT_PARAM_NAMES})
  params = calibrated_params(variables["params"], variables[QUANT_STATS])
  return {**variables, "params": params, QUANT_STATS: running}
