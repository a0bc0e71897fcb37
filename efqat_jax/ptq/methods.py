"""The registry of PTQ methods: how a calibrated layer's float weights become quantized ones.

A method is a function of one layer's float weight, its calibrated scale, its format, the
statistics captured for it and the method's settings; it returns the weight to store (values on
the layer's grid, so that the quantized ops' rounding keeps them). ``quantize_weights`` applies a
method to every layer of a model, one layer of a ``nn.scan`` / ``nn.vmap`` stack at a time.

Adding a method is one module that calls ``PTQ_METHODS.register``; see ``efqat_jax/ptq/rtn.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from efqat_jax.fields import Schema
from efqat_jax.nn.layer_table import QuantizedLayer, params_at
from efqat_jax.quant.fake_quant import valid_scale
from efqat_jax.quant.spec import QuantSpec
from efqat_jax.registry import Registry

# (weight, scale, spec, statistics, settings) -> quantized weight, for one layer.
QuantizeWeight = Callable[
  [jax.Array, jax.Array, QuantSpec, Mapping[str, jax.Array], Any], jax.Array
]


@dataclasses.dataclass(frozen=True)
class PtqMethod:
  """A registered PTQ method.

  Attributes:
    quantize_weight: one layer's ``(weight, scale, spec, statistics, settings) -> weight``.
    fields: the fields of its config block ``config.ptq.<name>`` (empty: no block).
    statistics: the per-layer statistics it needs captured from calibration data (none for
      round-to-nearest).
    summary: one line for the field listing.
  """

  quantize_weight: QuantizeWeight
  summary: str
  fields: Schema = dataclasses.field(default_factory=dict)
  statistics: tuple[str, ...] = ()


PTQ_METHODS: Registry[PtqMethod] = Registry("ptq.method")


def quantize_weights(
  method: PtqMethod,
  params: Any,
  layers: Mapping[str, QuantizedLayer],
  statistics: Mapping[str, Mapping[str, jax.Array]] | None = None,
  settings: Any = None,
) -> Any:
  """``params`` with every quantized layer's weight replaced by ``method``'s result.

  Args:
    method: the PTQ method.
    params: calibrated params (each layer's weight scale installed).
    layers: the model's quantized layers (``efqat_jax.nn.quantized_layers``).
    statistics: per layer path, the statistics ``method.statistics`` names (stacked like the
      layer's weight for a stack).
    settings: the method's config block, passed through.
  """
  statistics = statistics or {}

  def quantize_all(params, statistics):
    new = jax.tree.map(lambda x: x, params)  # a copy: the caller's tree is left as it was
    for path, layer in layers.items():
      node = params_at(new, path)
      stats = {name: statistics[path][name] for name in method.statistics}
      one_layer = lambda w, s, st, layer=layer: method.quantize_weight(
        w, valid_scale(s), layer.weight_spec, st, settings
      )
      for _ in layer.stack_shape:
        one_layer = jax.vmap(one_layer)
      node[layer.weight_name] = one_layer(node[layer.weight_name], node[layer.scale_name], stats)
    return new

  return jax.jit(quantize_all)(params, statistics)  # one program for every layer
