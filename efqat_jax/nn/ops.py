"""Quantizing stand-ins for ``lax.dot_general``, ``lax.conv_general_dilated``, a two-operand
``einsum`` and an embedding lookup.

Flax's ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Conv`` accept the op they compute with
(``dot_general=`` / ``conv_general_dilated=``). ``QuantizedOps`` provides those ops, bound to
the layer's own Flax scope, so the quantization parameters land next to the kernel
(``kernel_scale``, ``input_scale``, ``input_zero_point``) while the layer keeps every feature
of its Flax original (dtypes, padding modes, masks, initialisers).

How weights are rounded in Mode.QUANTIZE is taken from outside: ``weight_rounding(fn)``
(``efqat_jax.nn.rounding``) sets a ``WeightRounding`` for every quantized op traced inside it
(round to nearest by default).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import functools
from collections.abc import Collection, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax.core.scope import Scope
from jax import lax

from efqat_jax.nn import layer_table
from efqat_jax.nn.conv_weight_grad import conv_settings
from efqat_jax.nn.einsum import einsum_plan
from efqat_jax.nn.partial_grad import channel_subset_grad
from efqat_jax.nn.rounding import RoundingContext, current_weight_rounding, round_to_nearest
from efqat_jax.quant import granularity, integer, ranges
from efqat_jax.quant.fake_quant import (
  fake_quant,
  lsq_grad_scale,
  valid_scale,
  valid_zero_point,
)
from efqat_jax.quant.spec import QuantSpec

QUANT_STATS = "quant_stats"  # where efqat_jax.ptq.calibrate returns the running input ranges
# Mode.INTEGER's largest accumulator magnitude, kept in ``params`` when that is mutable.
ACCUMULATOR_MAX = "accumulator_max_abs"
QUANT_PARAM_NAMES = ("kernel_scale", "embedding_scale", "input_scale", "input_zero_point")
# Running input ranges of Mode.CALIBRATE, kept in ``params`` while calibrating (see Mode).
CALIBRATION_STATS = ("input_min", "input_max", "input_count")
# Where ``capturing_inputs`` puts the input a layer's weight multiplies.
CAPTURED_INPUT = "captured_input"


_CAPTURING: contextvars.ContextVar[tuple[bool, frozenset[str] | None]] = contextvars.ContextVar(
  "efqat_jax_capturing_inputs", default=(False, None)
)


@contextlib.contextmanager
def capturing_inputs(paths: Collection[str] | None = None) -> Iterator[None]:
  """Every quantized op traced inside puts the input its weight multiplies into ``params`` as
  ``captured_input`` (which must be mutable): the quantized input in Mode.QUANTIZE, the float
  one in Mode.FLOAT. Inside ``nn.scan`` / ``nn.vmap`` the inputs are stacked like the params;
  a layer called twice keeps its last call's. Embedding lookups capture nothing.

  Args:
    paths: module paths (``RoundingContext.path``) to capture; None: every layer.
  """
  token = _CAPTURING.set((True, None if paths is None else frozenset(paths)))
  try:
    yield
  finally:
    _CAPTURING.reset(token)


def _captures(path: str) -> bool:
  active, paths = _CAPTURING.get()
  return active and (paths is None or path in paths)


class Mode(enum.Enum):
  """What a quantized layer computes.

  FLOAT: the float op (quantization parameters are kept but unused).
  CALIBRATE: the float op, folding the input range into running statistics and writing the
    calibrated scales and zero points over the quantization params. Both live in the
    ``params`` collection, which must be mutable: ``params`` is the collection every lifted
    transform (``nn.scan``, ``nn.vmap``) maps, so calibration works through them unedited.
    ``efqat_jax.ptq.calibrate`` runs this and moves the statistics out of the params.
  QUANTIZE: fake-quantized input and kernel (training and evaluation).
  INTEGER: the integer reference path (int32 accumulation); records the largest accumulator
    magnitude as ``accumulator_max_abs`` in ``params`` when that is mutable (see
    ``efqat_jax.nn.integer_apply``).
  """

  FLOAT = "float"
  CALIBRATE = "calibrate"
  QUANTIZE = "quantize"
  INTEGER = "integer"


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedOps:
  """Quantizing ops bound to one layer's scope.

  Attributes:
    scope: the Flax scope of the layer (its params and collections).
    weight_spec: format of the weight, or None to leave it in float. For weights,
      ``granularity="channel"`` always means per output channel (every axis the op does not
      contract: one axis for Dense and Conv, heads x features for an attention projection,
      the rows of an embedding table).
    input_spec: format of the input activations, or None to leave them in float.
    mode: see ``Mode``.
    ema_momentum: momentum of the running input range in Mode.CALIBRATE.
    weight_estimator: how Mode.CALIBRATE ranges the weight, ``"minmax"`` or ``"mse"``.
    weight_name: the weight param's name (``"kernel"``; ``"embedding"`` for ``nn.Embed``); its
      scale is ``<weight_name>_scale``.

  A partly trained layer (EfQAT) finds its trainable output channels as an int32 leaf
  ``weight_grad_channels`` next to its weight in the params it runs with, and computes the
  weight gradient of those channels only (``efqat_jax.efqat.restrict_backward`` adds it).
  """

  scope: Scope
  weight_spec: QuantSpec | None
  input_spec: QuantSpec | None
  mode: Mode = Mode.QUANTIZE
  ema_momentum: float = 0.9
  weight_estimator: str = "minmax"
  weight_name: str = "kernel"
  calls: list[str] = dataclasses.field(default_factory=list, repr=False)

  def __post_init__(self):
    if self.weight_spec is not None and not self.weight_spec.symmetric:
      raise ValueError(
        f"{self.path}: weight_spec must be symmetric (kernel zero points are not supported)"
      )
    if not 0.0 <= self.ema_momentum < 1.0:
      raise ValueError(f"ema_momentum must be in [0, 1), got {self.ema_momentum!r}")
    if self.weight_estimator not in WEIGHT_ESTIMATORS:
      raise ValueError(
        f"weight_estimator must be one of {tuple(WEIGHT_ESTIMATORS)}, got {self.weight_estimator!r}"
      )

  @property
  def scale_name(self) -> str:
    return f"{self.weight_name}_scale"

  def dot_general(
    self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None
  ) -> jax.Array:
    """Drop-in for ``lax.dot_general`` with ``lhs`` the input and ``rhs`` the kernel."""
    (lc, rc), (lb, rb) = dimension_numbers
    dims = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    out_axes = tuple(d for d in range(rhs.ndim) if d not in rc and d not in rb)
    float_op = functools.partial(
      lax.dot_general,
      dimension_numbers=dims,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
    return self._run(lhs, rhs, out_axes, float_op, dict(op="dot_general", dimension_numbers=dims))

  def einsum(self, equation, lhs, rhs, precision=None, preferred_element_type=None) -> jax.Array:
    """``jnp.einsum(equation, lhs, rhs)`` with ``rhs`` the kernel, as one quantized dot_general."""
    plan = einsum_plan(equation, lhs.ndim, rhs.ndim)
    y = self.dot_general(lhs, rhs, plan.dimension_numbers, precision, preferred_element_type)
    return jnp.transpose(y, plan.output_perm)

  def take(self, table, ids) -> jax.Array:
    """``jnp.take(table, ids, axis=0)`` (an embedding lookup) with the table quantized per row.

    The ids are not quantized (``input_spec`` does not apply).
    """
    float_op = lambda ids_, table_: jnp.take(table_, ids_, axis=0)
    return self._run(ids, table, (0,), float_op, dict(op="take", dimension_numbers=None))

  def conv_general_dilated(
    self,
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
  ) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` with ``lhs`` the input and ``rhs`` the kernel."""
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    n_spatial = lhs.ndim - 2
    rhs_dilation = tuple(rhs_dilation or (1,) * n_spatial)
    float_op = functools.partial(
      lax.conv_general_dilated,
      window_strides=window_strides,
      padding=padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dn,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
    if self.mode is Mode.INTEGER and (
      any(d != 1 for d in (lhs_dilation or ())) or batch_group_count != 1
    ):
      raise ValueError(
        f"{self.path}: the integer conv path supports lhs_dilation=1 and batch_group_count=1,"
        f" got {lhs_dilation} and {batch_group_count}"
      )
    settings = dict(
      op="conv",
      dimension_numbers=dn,
      window_strides=tuple(window_strides),
      padding=padding if isinstance(padding, str) else tuple(tuple(p) for p in padding),
      rhs_dilation=rhs_dilation,
      feature_group_count=feature_group_count,
    )
    return self._run(lhs, rhs, (dn.rhs_spec[0],), float_op, settings)

  @property
  def path(self) -> str:
    """The layer's module path, ``/``-joined."""
    return "/".join(self.scope.path)

  def _kernel_spec(self, out_axes: tuple[int, ...]) -> QuantSpec | None:
    spec = self.weight_spec
    if spec is None or spec.granularity != "channel":
      return spec
    return dataclasses.replace(spec, axis=out_axes[0] if len(out_axes) == 1 else out_axes)

  def _run(self, lhs, rhs, out_axes, float_op, settings: dict[str, Any]) -> jax.Array:
    self.calls.append(settings["op"])
    kernel_spec = self._kernel_spec(out_axes)
    input_spec = None if settings["op"] == "take" else self.input_spec
    if kernel_spec is not None and layer_table.is_recording():
      layer_table.report(
        layer_table.QuantizedLayer(
          self.path, self.weight_name, kernel_spec, input_spec, tuple(rhs.shape), out_axes,
          tuple(settings.items()),
          macs_per_weight=layer_table.macs_per_weight(
            settings, rhs.shape, jax.eval_shape(float_op, lhs, rhs).size
          ),
        )
      )  # fmt: skip
    params = self._params(lhs, rhs, kernel_spec, input_spec)
    if self.mode is Mode.CALIBRATE and not self.scope.get_flag("initializing", False):
      self._calibrate(lhs, rhs, kernel_spec, input_spec)
    if self.mode in (Mode.FLOAT, Mode.CALIBRATE):
      self._capture(lhs, settings)
      return float_op(lhs, rhs)
    if self.mode is Mode.INTEGER:
      return self._integer(lhs, rhs, params, kernel_spec, input_spec, settings)
    if input_spec is not None:
      lhs = fake_quant(
        lhs,
        params["input_scale"],
        params.get("input_zero_point"),
        spec=input_spec,
        grad_scale=_input_grad_scale(lhs, input_spec),
      )
    self._capture(lhs, settings)
    if kernel_spec is not None:
      rounding = self._weight_rounding(kernel_spec)
      rhs = fake_quant(rhs, params[self.scale_name], spec=kernel_spec, rounding=rounding)
    channels = self.scope.get_variable("params", layer_table.GRAD_CHANNELS)
    if channels is not None:
      return self._channel_subset_op(float_op, lhs, rhs, channels, out_axes, settings)
    return float_op(lhs, rhs)

  def _capture(self, lhs, settings) -> None:
    """Puts ``lhs`` into ``params`` inside ``capturing_inputs`` (see there)."""
    if settings["op"] == "take" or self.mode is Mode.CALIBRATE or not _captures(self.path):
      return
    if not self.scope.is_mutable_collection("params"):
      raise ValueError(f"{self.path}: capturing_inputs needs apply(..., mutable=['params'])")
    self.scope.put_variable("params", CAPTURED_INPUT, lhs)

  def _weight_rounding(self, kernel_spec: QuantSpec):
    """The current weight rounding bound to this layer, or None for round to nearest."""
    fn = current_weight_rounding(self.path)
    if fn is round_to_nearest:
      return None
    context = RoundingContext(
      self.path, self.weight_name, kernel_spec, dict(self.scope.variables().get("params", {}))
    )
    return lambda u: fn(u, context)

  def _channel_subset_op(self, float_op, lhs, rhs, channels, out_axes, settings) -> jax.Array:
    """``float_op(lhs, rhs)`` with the weight gradient of ``channels`` only.

    A dot_general whose output axes are not the kernel's trailing axes runs on the kernel
    transposed so that they are (its output is the same). Grouped convolutions other than
    depthwise ones compute their full weight gradient.
    """
    op = settings["op"]
    if op == "take":
      return float_op(lhs, rhs)  # a lookup's weight gradient is a scatter of the rows it read
    trailing = tuple(range(rhs.ndim - len(out_axes), rhs.ndim))
    if op == "dot_general" and out_axes != trailing:
      (lc, rc), (lb, rb) = settings["dimension_numbers"]
      perm = [d for d in range(rhs.ndim) if d not in out_axes] + list(out_axes)
      position = {d: i for i, d in enumerate(perm)}
      dims = ((lc, tuple(position[d] for d in rc)), (lb, tuple(position[d] for d in rb)))
      float_op = functools.partial(float_op, dimension_numbers=dims)
      rhs, out_axes = jnp.transpose(rhs, perm), trailing
    elif out_axes != trailing:
      raise ValueError(
        f"{self.path}: a channel-subset weight gradient needs the kernel's output axes last,"
        f" got output axes {out_axes} of a {rhs.ndim}-D kernel"
      )
    groups = settings.get("feature_group_count", 1)
    depthwise = groups > 1
    if depthwise:
      in_features = lhs.shape[settings["dimension_numbers"].lhs_spec[1]]
      if not groups == in_features == rhs.shape[-1]:
        return float_op(lhs, rhs)
    conv = conv_settings(float_op) if op == "conv" else None  # None for grouped convs
    return channel_subset_grad(float_op, lhs, rhs, channels, len(out_axes), depthwise, conv)

  def _params(self, lhs, rhs, kernel_spec, input_spec) -> dict[str, jax.Array]:
    """Creates (at init) or reads the quantization params, as the valid values they stand
    for (``valid_scale``, ``valid_zero_point``); initial values from min-max."""
    params = {}
    if kernel_spec is not None:
      scale = self._param(self.scale_name, lambda: _minmax_scale(rhs, kernel_spec))
      params[self.scale_name] = valid_scale(scale)
    if input_spec is not None:
      input_range = lambda: ranges.scale_and_zero_point(*ranges.minmax(lhs, input_spec), input_spec)
      params["input_scale"] = valid_scale(self._param("input_scale", lambda: input_range()[0]))
      if not input_spec.symmetric:
        zero_point = self._param("input_zero_point", lambda: input_range()[1])
        params["input_zero_point"] = valid_zero_point(zero_point, input_spec)
    return params

  def _param(self, name: str, init) -> jax.Array:
    """The param ``name`` of this layer, created with ``init()`` if it does not exist yet (a
    layer whose scope sees several calls, e.g. a tied embedding's lookup and attend)."""
    if self.scope.has_variable("params", name):
      return self.scope.get_variable("params", name)
    return self.scope.variable("params", name, init).value

  def _calibrate(self, lhs, rhs, kernel_spec, input_spec) -> None:
    """Folds ``lhs`` into the running input range and writes the calibrated quantization
    params, all in the ``params`` collection."""
    if not self.scope.is_mutable_collection("params"):
      raise ValueError(
        f"{self.path}: Mode.CALIBRATE writes the calibrated scales and running ranges into"
        " 'params'; call apply(..., mutable=['params']) (or use efqat_jax.ptq.calibrate)"
      )
    if kernel_spec is not None:
      scale = WEIGHT_ESTIMATORS[self.weight_estimator](rhs, kernel_spec)
      self.scope.put_variable("params", self.scale_name, scale)
    if input_spec is None:
      return
    empty = ranges.ema_init(granularity.param_shape(input_spec, lhs.shape))
    stats = [
      self.scope.get_variable("params", name, default)
      for name, default in zip(CALIBRATION_STATS, empty, strict=True)
    ]
    new = ranges.ema_update(ranges.EmaRange(*stats), lhs, input_spec, self.ema_momentum)
    for name, value in zip(CALIBRATION_STATS, new, strict=True):
      self.scope.put_variable("params", name, value)
    scale, zero_point = ranges.scale_and_zero_point(new.lo, new.hi, input_spec)
    self.scope.put_variable("params", "input_scale", scale)
    if zero_point is not None:
      self.scope.put_variable("params", "input_zero_point", zero_point)

  def _integer(self, lhs, rhs, params, kernel_spec, input_spec, settings) -> jax.Array:
    if kernel_spec is None:
      raise ValueError(f"{self.path}: Mode.INTEGER needs a quantized kernel (weight spec is None)")
    layer = integer.export_layer(
      rhs,
      params[self.scale_name],
      kernel_spec,
      params.get("input_scale"),
      params.get("input_zero_point"),
      input_spec,
      **settings,
    )
    y, acc_max = integer.apply_integer(layer, lhs)
    if settings["op"] != "take" and self.scope.is_mutable_collection("params"):
      seen = self.scope.get_variable("params", ACCUMULATOR_MAX, jnp.zeros((), jnp.int32))
      self.scope.put_variable("params", ACCUMULATOR_MAX, jnp.maximum(seen, acc_max))
    return y.astype(rhs.dtype if settings["op"] == "take" else jnp.result_type(lhs, rhs))


def _minmax_scale(kernel: jax.Array, spec: QuantSpec) -> jax.Array:
  return ranges.scale_and_zero_point(*ranges.minmax(kernel, spec), spec)[0]


def _mse_scale(kernel: jax.Array, spec: QuantSpec) -> jax.Array:
  return ranges.scale_and_zero_point(*ranges.mse(kernel, spec), spec)[0]


WEIGHT_ESTIMATORS = {"minmax": _minmax_scale, "mse": _mse_scale}


def _input_grad_scale(x: jax.Array, spec: QuantSpec) -> float:
  """LSQ gradient scale for activations: counts entries per example (axis 0 is the batch)."""
  per_scale = granularity.elements_per_param(spec, x.shape)
  batch = x.shape[0] if x.ndim > 1 else 1
  return lsq_grad_scale(spec, per_scale // batch)
