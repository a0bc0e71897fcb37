"""Keeping an accumulator guarantee through training: project the weights after every update.

A model quantized with AXE never overflows its P-bit accumulators; an optimizer step can undo
that. ``project_weight`` restores it in the integer domain the export uses: for each output
channel and tile whose integer weights ``round(w / s)`` break ``nu p + mu n <= A`` or
``mu p + nu n >= -A``, it scales that tile's float weights by the largest factor in ``[0, 1]``
(found by bisection, checked on the very weights it returns) whose integers fit. Tiles are runs
of the layer's inputs in the accumulator's order (``AccumulatorSpec.order``), as AXE made them.
Tiles that fit are returned bit for bit, so frozen weights stay frozen unless their scale moved
them out.

Example:
  >>> constrain = lambda params: project_params(params, layers, {"Dense_0": AccumulatorSpec(16)})
  >>> step = make_train_step(qmodel, tx, mesh, constrain=constrain)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from efqat_jax.nn.layer_table import QuantizedLayer, params_at
from efqat_jax.quant.accumulator import AccumulatorSpec, input_range
from efqat_jax.quant.fake_quant import valid_scale
from efqat_jax.quant.integer import quantize_to_int
from efqat_jax.quant.rows import from_rows, summation_axes, tiles_of, to_rows


def project_weight(
  weight: jax.Array,
  scale: jax.Array,
  layer: QuantizedLayer,
  accumulator: AccumulatorSpec,
  iterations: int = 30,
) -> jax.Array:
  """``weight`` (one layer's) with every output channel and tile fitting ``accumulator``.

  Args:
    weight: the float kernel.
    scale: its weight scale (as stored; made valid as the quantized ops do).
    layer: the layer (its formats and op); its inputs must be integers.
    accumulator: P, the tile size and the order the inputs are summed in.
    iterations: bisection steps for the shrink factor.
  """
  op = dict(layer.op)
  out_axes, in_axes = summation_axes(
    op["op"], op["dimension_numbers"], weight.ndim, accumulator.order
  )
  spec, scale = layer.weight_spec, valid_scale(scale)
  mu, nu = input_range(layer.input_spec)
  rows = to_rows(weight, out_axes, in_axes)
  k = rows.shape[1]
  tile = min(accumulator.tile_size(k), k)
  if max(abs(spec.qmin), spec.qmax) * tile * max(nu, -mu) >= 2**31:
    raise ValueError(f"{layer.path}: tiles of {tile} inputs are too long for int32 sums")

  def candidate(factors):
    return from_rows(
      rows * jnp.repeat(factors, tile, axis=1)[:, :k], weight.shape, out_axes, in_axes
    )

  def fits(w):
    q = to_rows(quantize_to_int(w, scale, None, spec).astype(jnp.int32), out_axes, in_axes)
    q = tiles_of(q, tile)
    p, n = jnp.sum(jnp.maximum(q, 0), -1), jnp.sum(jnp.minimum(q, 0), -1)
    return (nu * p + mu * n <= accumulator.limit) & (mu * p + nu * n >= -accumulator.limit)

  ok = fits(weight)

  def shrink():
    def halve(_, bounds):
      lo, hi = bounds
      mid = 0.5 * (lo + hi)
      good = fits(candidate(mid))
      return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    start = (jnp.zeros(ok.shape, rows.dtype), jnp.ones(ok.shape, rows.dtype))
    lo, _ = lax.fori_loop(0, iterations, halve, start)
    return candidate(jnp.where(ok, 1.0, lo).astype(rows.dtype))

  return lax.cond(jnp.all(ok), lambda: weight, shrink)


def project_params(
  params: Any,
  layers: Mapping[str, QuantizedLayer],
  accumulators: Mapping[str, AccumulatorSpec],
) -> Any:
  """``params`` with the weight of every layer in ``accumulators`` projected (every unit of a
  stack on its own)."""
  new = jax.tree.map(lambda x: x, params)
  for path, accumulator in accumulators.items():
    layer = layers[path]
    node = params_at(new, path)
    one = lambda w, s, layer=layer, accumulator=accumulator: project_weight(
      w, s, layer, accumulator
    )
    for _ in layer.stack_shape:
      one = jax.vmap(one)
    node[layer.weight_name] = one(node[layer.weight_name], node[layer.scale_name])
  return new
