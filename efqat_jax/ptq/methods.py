"""The registry of PTQ methods: how a calibrated layer's float weights become quantized ones.

A method is a function of one layer's float weight, its calibrated scale, the layer (its format
and op: ``QuantizedLayer``), the statistics captured for it and the method's settings; it returns
the weight to store (values on the layer's grid, so that the quantized ops' rounding keeps them).
``quantize_weights`` applies a method to every layer of a model, one layer of a ``nn.scan`` /
``nn.vmap`` stack at a time. A method that needs statistics (OPTQ's ``H``, Attention Round's
optimised offsets) quantizes the layers in call order, each captured with the layers before it
already quantized; ``PtqMethod.capture_for`` builds that capture from calibration data.

Adding a method is one module that calls ``PTQ_METHODS.register``; see ``efqat_jax/ptq/rtn.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from efqat_jax.fields import Schema
from efqat_jax.nn.layer_table import QuantizedLayer, params_at, with_params_at
from efqat_jax.ptq.capture import Capture, statistics_capture
from efqat_jax.quant.fake_quant import valid_scale
from efqat_jax.registry import Registry

# (weight, scale, layer, statistics, settings) -> quantized weight, for one layer.
QuantizeWeight = Callable[
  [jax.Array, jax.Array, QuantizedLayer, Mapping[str, jax.Array], Any], jax.Array
]
# (quantized model, calibrated variables, calibration batches, settings, **apply kwargs) -> Capture
CaptureFactory = Callable[..., Capture]


@dataclasses.dataclass(frozen=True)
class PtqMethod:
  """A registered PTQ method.

  Attributes:
    quantize_weight: one layer's ``(weight, scale, layer, statistics, settings) -> weight``.
    summary: one line for the field listing.
    fields: the fields of its config block ``config.ptq.<name>`` (empty: no block).
    statistics: the per-layer statistics it needs captured from calibration data (``"h"``,
      ``"g"``: ``efqat_jax.ptq.capture``; others with their own ``capture``); none for
      round-to-nearest.
    check: ``(settings, formats) -> None``, raising ConfigError for settings that cannot work
      with these per-layer formats (``efqat_jax.nn.formats``); run before anything is computed.
    formats: ``(settings, formats) -> formats``: the per-layer formats the method produces from
      the configured ones (e.g. an accumulator constraint, or its own bit widths); None keeps
      them. They travel with the PTQ result to every later stage.
    capture: builds the per-layer capture of ``statistics`` that are not ``h`` / ``g``:
      ``(qmodel, variables, batches, settings, **apply_kwargs) -> Capture``.
    samples: ``settings -> calibration samples`` the capture wants (None: the calibration
      batches).
  """

  quantize_weight: QuantizeWeight
  summary: str
  fields: Schema = dataclasses.field(default_factory=dict)
  statistics: tuple[str, ...] = ()
  check: Callable[[Any, Mapping[str, Any]], None] | None = None
  formats: Callable[[Any, Mapping[str, Any]], dict] | None = None
  capture: CaptureFactory | None = None
  samples: Callable[[Any], int] | None = None

  def formats_for(self, settings: Any, formats: Mapping[str, Any]) -> dict:
    """The per-layer formats this method gives a model configured with ``formats``."""
    return dict(formats) if self.formats is None else self.formats(settings, formats)

  def capture_for(self, qmodel, variables, batches, settings, **apply_kwargs) -> Capture | None:
    """The capture ``quantize_weights`` needs for this method (None: no statistics)."""
    if not self.statistics:
      return None
    if self.capture is not None:
      return self.capture(qmodel, variables, batches, settings, **apply_kwargs)
    return statistics_capture(qmodel, variables, batches, self.statistics, **apply_kwargs)


PTQ_METHODS: Registry[PtqMethod] = Registry("ptq.method")


def quantize_weights(
  method: PtqMethod,
  params: Any,
  layers: Mapping[str, QuantizedLayer],
  settings: Any = None,
  capture: Capture | None = None,
  progress: Callable[[str], None] | None = None,
) -> Any:
  """``params`` with every quantized layer's weight replaced by ``method``'s result.

  Args:
    method: the PTQ method.
    params: calibrated params (each layer's weight scale installed).
    layers: the model's quantized layers in call order (``efqat_jax.nn.quantized_layers``).
    settings: the method's config block, passed through.
    capture: for a method with statistics, ``(params, layer) -> statistics``
      (``PtqMethod.capture_for``), called with the layers before it quantized.
    progress: called with each layer's path once it is quantized.
  """
  if not method.statistics:
    # One program for every layer.
    return jax.jit(lambda p: _quantize_layers(method, p, layers, settings))(params)
  if capture is None:
    raise ValueError(f"this PTQ method needs statistics {method.statistics}: pass capture=")
  # One program per distinct layer (its shapes, formats and op, not its path): the repeated
  # layers of a deep model compile once.
  programs: dict[QuantizedLayer, Callable] = {}
  for path, layer in layers.items():
    stats = {} if dict(layer.op)["op"] == "take" else dict(capture(params, layer))
    key = layer.without_path()
    if key not in programs:
      programs[key] = jax.jit(_layer_function(method, layer, settings))
    node = params_at(params, path)
    weight = programs[key](node[layer.weight_name], node[layer.scale_name], stats)
    params = with_params_at(params, path, {layer.weight_name: weight})
    if progress is not None:
      jax.block_until_ready(params)
      progress(path)
  return params


def _layer_function(method: PtqMethod, layer: QuantizedLayer, settings: Any) -> Callable:
  """``(weight, scale, statistics) -> weight`` for one layer, mapped over its stack axes."""

  def one_layer(weight, scale, stats):
    return method.quantize_weight(weight, valid_scale(scale), layer, stats, settings)

  for _ in layer.stack_shape:
    one_layer = jax.vmap(one_layer)
  return one_layer


def _quantize_layers(method, params, layers, settings):
  for path, layer in layers.items():
    node = params_at(params, path)
    weight = _layer_function(method, layer, settings)(
      node[layer.weight_name], node[layer.scale_name], {}
    )
    params = with_params_at(params, path, {layer.weight_name: weight})
  return params
