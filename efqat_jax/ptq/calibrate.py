"""Post-training calibration: run batches in Mode.CALIBRATE, install the ranges (RTN baseline).

With the calibrated scales installed, the quantized model rounds every weight and activation
to the nearest level of its grid: round-to-nearest PTQ, the baseline the layer-wise methods
improve on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from efqat_jax.nn.direct_matmuls import warn_direct_matmuls
from efqat_jax.nn.export import with_mode
from efqat_jax.nn.intercept import QuantizedModel, quantizable_paths
from efqat_jax.nn.ops import CALIBRATION_STATS, QUANT_STATS, Mode
from efqat_jax.trees import merge_trees, on_inputs_mesh


def split_calibration_stats(params: Any) -> tuple[Any, Any]:
  """``(params without the running ranges, the running ranges)`` after Mode.CALIBRATE."""
  flat = flatten_dict(params)
  stats = {k: v for k, v in flat.items() if k[-1] in CALIBRATION_STATS}
  rest = {k: v for k, v in flat.items() if k[-1] not in CALIBRATION_STATS}
  return unflatten_dict(rest), unflatten_dict(stats)


def _warn_direct_matmuls(model, variables, inputs, apply_kwargs) -> None:
  """Warns about params a ``quantize``d model multiplies directly (they stay float)."""
  if isinstance(model, QuantizedModel):
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    layers = lambda: quantizable_paths(model, *inputs, **apply_kwargs)
    warn_direct_matmuls(with_mode(model, Mode.QUANTIZE), variables, inputs, apply_kwargs, layers)


def calibrate(
  model: nn.Module,
  variables: dict[str, Any],
  batches: Iterable[Any],
  num_batches: int,
  progress: Callable[[int], None] | None = None,
  **apply_kwargs,
) -> dict[str, Any]:
  """Folds ``num_batches`` input batches into the ranges and installs them in the params.

  Works through ``nn.scan`` / ``nn.remat`` / ``nn.vmap`` without editing the model: the running
  ranges ride in the ``params`` collection while calibrating (see ``Mode.CALIBRATE``).

  Args:
    model: a QuantizedModel (or any model with a ``mode`` field).
    variables: its variables; the running ranges start empty.
    batches: an iterable of model inputs (a tuple is spread over the model's arguments).
    num_batches: how many to use (at least 1; fewer if the iterable ends first).
    progress: called with the number of batches done after each batch has been computed
      (e.g. to advance a progress bar, below).
    **apply_kwargs: extra keyword arguments of ``model.apply`` (e.g. ``train=False``).

  Returns:
    The variables with calibrated params and the final running ranges in ``quant_stats``.

  Example:
    >>> with tqdm.tqdm(total=num_batches, desc="ptq calibrate") as bar:
    ...   calibrated = calibrate(
    ...     qmodel, variables, batches, num_batches, progress=lambda done: bar.update()
    ...   )
  """
  if num_batches < 1:
    raise ValueError(f"num_batches must be >= 1, got {num_batches}")
  calibrating = with_mode(model, Mode.CALIBRATE)

  def observe(variables, inputs):
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    _, state = calibrating.apply(variables, *inputs, mutable=["params"], **apply_kwargs)
    return {**variables, **state}

  params, _ = split_calibration_stats(variables["params"])
  variables = {k: v for k, v in variables.items() if k != QUANT_STATS} | {"params": params}
  step, seen = None, 0
  for inputs in batches:
    if seen == num_batches:
      break
    if step is None:  # the running ranges exist from here on: one trace for every batch
      _warn_direct_matmuls(model, variables, inputs, apply_kwargs)
      shapes = jax.eval_shape(observe, variables, inputs)["params"]
      empty = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), split_calibration_stats(shapes)[1]
      )
      variables = {**variables, "params": merge_trees(variables["params"], empty)}
      variables = on_inputs_mesh(variables, inputs)
      step = jax.jit(observe)
    variables = step(variables, inputs)
    seen += 1
    if progress is not None:
      jax.block_until_ready(variables)
      progress(seen)
  if seen == 0:
    raise ValueError("calibrate got no batches")
  params, stats = split_calibration_stats(variables["params"])
  return {**variables, "params": params, QUANT_STATS: stats}
