"""Quantizing stand-ins for ``lax.dot_general`` and ``lax.conv_general_dilated``.

Flax's ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Conv`` accept the op they compute with
(``dot_general=`` / ``conv_general_dilated=``). ``QuantizedOps`` provides those ops, bound to
the layer's own Flax scope, so the quantization parameters land next to the kernel
(``kernel_scale``, ``input_scale``, ``input_zero_point``) while the layer keeps every feature
of its Flax original (dtypes, padding modes, masks, initialisers).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import functools
import types
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core.scope import Scope
from jax import lax

from efqat_jax.nn.partial_grad import channel_subset_grad
from efqat_jax.quant import granularity, integer, ranges
from efqat_jax.quant.fake_quant import fake_quant, lsq_grad_scale
from efqat_jax.quant.spec import QuantSpec

QUANT_STATS = "quant_stats"
ACCUMULATOR = "accumulator"
QUANT_PARAM_NAMES = ("kernel_scale", "input_scale", "input_zero_point")


class Mode(enum.Enum):
  """What a quantized layer computes.

  FLOAT: the float op (quantization parameters are kept but unused).
  CALIBRATE: the float op, folding the input range into the ``quant_stats`` collection.
  QUANTIZE: fake-quantized input and kernel (training and evaluation).
  INTEGER: the integer reference path (int32 accumulation); records the largest accumulator
    magnitude in the ``accumulator`` collection when it is mutable.
  """

  FLOAT = "float"
  CALIBRATE = "calibrate"
  QUANTIZE = "quantize"
  INTEGER = "integer"


_RECORDER: contextvars.ContextVar[dict[str, integer.IntegerLayer] | None] = contextvars.ContextVar(
  "efqat_jax_integer_recorder", default=None
)


@contextlib.contextmanager
def record_integer_layers():
  """Collects, by module path, the IntegerLayer of every layer run in Mode.INTEGER."""
  layers: dict[str, integer.IntegerLayer] = {}
  token = _RECORDER.set(layers)
  try:
    yield layers
  finally:
    _RECORDER.reset(token)


_WEIGHT_GRAD_CHANNELS: contextvars.ContextVar[Mapping[str, jax.Array]] = contextvars.ContextVar(
  "efqat_jax_weight_grad_channels", default=types.MappingProxyType({})
)


@contextlib.contextmanager
def weight_grad_channels(channels: Mapping[str, jax.Array]):
  """Within: the layer at path ``p`` (in Mode.QUANTIZE) computes its kernel's gradient only for
  the output channels ``channels[p]`` (int32[k]); the other channels get a zero gradient.

  Use it around the forward pass that ``jax.grad`` differentiates (as ``make_train_step`` does
  for an EfQAT TrainableSet). Output channels are flattened in C order over the kernel's
  output axes, which must be its trailing axes (true of Flax's Dense, DenseGeneral and Conv).
  """
  token = _WEIGHT_GRAD_CHANNELS.set(channels)
  try:
    yield
  finally:
    _WEIGHT_GRAD_CHANNELS.reset(token)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedOps:
  """Quantizing ops bound to one layer's scope.

  Attributes:
    scope: the Flax scope of the layer (its params and collections).
    weight_spec: format of the kernel, or None to leave it in float. For kernels,
      ``granularity="channel"`` always means per output channel (every non-contracted axis).
    input_spec: format of the input activations, or None to leave them in float.
    mode: see ``Mode``.
    ema_momentum: momentum of the running input range in Mode.CALIBRATE.
    weight_estimator: how Mode.CALIBRATE ranges the kernel, ``"minmax"`` or ``"mse"``.

  In Mode.CALIBRATE the ranges a PTQ step should install are written to ``quant_stats`` under
  the param names they replace (``kernel_scale``, ``input_scale``, ``input_zero_point``); see
  ``efqat_jax.ptq.calibrated_params``.
  """

  scope: Scope
  weight_spec: QuantSpec | None
  input_spec: QuantSpec | None
  mode: Mode = Mode.QUANTIZE
  ema_momentum: float = 0.9
  weight_estimator: str = "minmax"
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
    params = self._params(lhs, rhs, kernel_spec)
    calibrating = self.mode is Mode.CALIBRATE and not self.scope.get_flag("initializing", False)
    if calibrating and not self.scope.is_mutable_collection(QUANT_STATS):
      raise ValueError(
        f"{self.path}: Mode.CALIBRATE updates the '{QUANT_STATS}' collection; call"
        f" apply(..., mutable=['{QUANT_STATS}'])"
      )
    if self.input_spec is not None and self.scope.is_mutable_collection(QUANT_STATS):
      self._observe(lhs, update=calibrating)
    if calibrating and kernel_spec is not None:
      scale = WEIGHT_ESTIMATORS[self.weight_estimator](rhs, kernel_spec)
      self.scope.put_variable(QUANT_STATS, "kernel_scale", scale)
    if self.mode in (Mode.FLOAT, Mode.CALIBRATE):
      return float_op(lhs, rhs)
    if self.mode is Mode.INTEGER:
      return self._integer(lhs, rhs, params, kernel_spec, settings)
    if self.input_spec is not None:
      lhs = fake_quant(
        lhs,
        params["input_scale"],
        params.get("input_zero_point"),
        spec=self.input_spec,
        grad_scale=_input_grad_scale(lhs, self.input_spec),
      )
    if kernel_spec is not None:
      rhs = fake_quant(rhs, params["kernel_scale"], spec=kernel_spec)
    channels = _WEIGHT_GRAD_CHANNELS.get().get(self.path)
    if channels is not None:
      return self._channel_subset_op(float_op, lhs, rhs, channels, out_axes, settings)
    return float_op(lhs, rhs)

  def _channel_subset_op(self, float_op, lhs, rhs, channels, out_axes, settings) -> jax.Array:
    """``float_op(lhs, rhs)`` with the weight gradient of ``channels`` only.

    Grouped convolutions other than depthwise ones compute their full weight gradient.
    """
    if out_axes != tuple(range(rhs.ndim - len(out_axes), rhs.ndim)):
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
    return channel_subset_grad(float_op, lhs, rhs, channels, len(out_axes), depthwise)

  def _params(self, lhs, rhs, kernel_spec) -> dict[str, jax.Array]:
    """Creates (at init) or reads the quantization params; initial values from min-max."""
    params = {}
    if kernel_spec is not None:
      init = lambda: _minmax_scale(rhs, kernel_spec)
      params["kernel_scale"] = self.scope.variable("params", "kernel_scale", init).value
    spec = self.input_spec
    if spec is not None:
      input_range = lambda: ranges.scale_and_zero_point(*ranges.minmax(lhs, spec), spec)
      params["input_scale"] = self.scope.variable(
        "params", "input_scale", lambda: input_range()[0]
      ).value
      if not spec.symmetric:
        params["input_zero_point"] = self.scope.variable(
          "params", "input_zero_point", lambda: input_range()[1]
        ).value
    return params

  def _observe(self, lhs, update: bool) -> None:
    """Creates the running input range and, if ``update``, folds ``lhs`` into it."""
    shape = granularity.param_shape(self.input_spec, lhs.shape)
    empty = ranges.ema_init(shape)
    names = ("input_min", "input_max", "input_count")
    stats = [
      self.scope.variable(QUANT_STATS, name, lambda v=v: v)
      for name, v in zip(names, empty, strict=True)
    ]
    if update:
      state = ranges.EmaRange(*(v.value for v in stats))
      new = ranges.ema_update(state, lhs, self.input_spec, self.ema_momentum)
      for var, value in zip(stats, new, strict=True):
        var.value = value
      scale, zero_point = ranges.scale_and_zero_point(new.lo, new.hi, self.input_spec)
      self.scope.put_variable(QUANT_STATS, "input_scale", scale)
      if zero_point is not None:
        self.scope.put_variable(QUANT_STATS, "input_zero_point", zero_point)

  def _integer(self, lhs, rhs, params, kernel_spec, settings) -> jax.Array:
    if kernel_spec is None:
      raise ValueError(f"{self.path}: Mode.INTEGER needs a quantized kernel (weight spec is None)")
    layer = integer.export_layer(
      rhs,
      params["kernel_scale"],
      kernel_spec,
      params.get("input_scale"),
      params.get("input_zero_point"),
      self.input_spec,
      **settings,
    )
    recorder = _RECORDER.get()
    if recorder is not None:
      recorder[self.path] = layer
    y, acc_max = integer.apply_integer(layer, lhs)
    if self.scope.is_mutable_collection(ACCUMULATOR):
      seen = self.scope.variable(ACCUMULATOR, "max_abs", lambda: jnp.zeros((), jnp.int32))
      seen.value = jnp.maximum(seen.value, acc_max)
    return y.astype(jnp.result_type(lhs, rhs))


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


OP_FIELDS = {
  nn.Dense: "dot_general",
  nn.DenseGeneral: "dot_general",
  nn.Conv: "conv_general_dilated",
}


def op_field(module: nn.Module) -> str | None:
  """Name of the op field of a quantizable Flax layer, or None for other modules."""
  for cls, field in OP_FIELDS.items():
    if isinstance(module, cls):
      return field
  return None


def is_quantized(module: nn.Module) -> bool:
  """Whether the layer already computes with QuantizedOps."""
  field = op_field(module)
  return field is not None and isinstance(
    getattr(getattr(module, field), "__self__", None), QuantizedOps
  )


def call_quantized(
  module: nn.Module, float_cls: type[nn.Module], ops_fields: dict, *args, **kwargs
):
  """Calls ``module`` as an instance of ``float_cls`` computing with QuantizedOps.

  The twin is bound to ``module``'s own scope, so it reads and creates the same params.

  Args:
    module: a bound Dense, DenseGeneral or Conv (or a subclass).
    float_cls: the Flax class whose ``__call__`` runs (``type(module)`` or its Flax base).
    ops_fields: keyword arguments of QuantizedOps besides ``scope``.
    *args: the layer's call arguments.
    **kwargs: the layer's call keyword arguments.
  """
  field = op_field(module)
  if getattr(module, field) is not None or getattr(module, f"{field}_cls", None) is not None:
    raise ValueError(
      f"cannot quantize {'/'.join(module.scope.path)}: it already sets a custom {field}"
    )
  ops = QuantizedOps(scope=module.scope, **ops_fields)
  fields = {
    f.name: getattr(module, f.name)
    for f in dataclasses.fields(float_cls)
    if f.init and f.name not in ("parent", "name")
  }
  fields[field] = getattr(ops, field)
  out = float_cls(**fields, parent=module.scope)(*args, **kwargs)
  if not ops.calls:
    raise ValueError(
      f"cannot quantize {'/'.join(module.scope.path)}: {float_cls.__name__}.__call__ never called"
      f" its {field}, so it would silently stay in float"
    )
  return out
