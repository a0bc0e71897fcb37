"""Quantized Flax Linen layers: Dense, DenseGeneral and Conv with quantized input and kernel.

Each is its Flax original (same fields, same params, same behaviour) plus three fields:
``weight_spec`` and ``input_spec`` (None leaves that operand in float) and ``mode``. The
quantization params sit next to the kernel: ``kernel_scale`` and, with an input spec,
``input_scale`` and ``input_zero_point`` (asymmetric only). Calibration keeps its running input
range in ``params`` while it runs (see ``Mode.CALIBRATE``) and returns it in ``quant_stats``.

Example:
  >>> layer = QuantDense(16, weight_spec=QuantSpec.for_weights(4))
  >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 8)))
  >>> sorted(variables["params"])
  ['bias', 'input_scale', 'input_zero_point', 'kernel', 'kernel_scale']
"""

from __future__ import annotations

import flax.linen as nn
import jax

from efqat_jax.nn.ops import Mode, QuantizedOps
from efqat_jax.nn.rewrite import run_with_ops
from efqat_jax.quant.spec import QuantSpec

DEFAULT_WEIGHT_SPEC = QuantSpec.for_weights(8)
DEFAULT_INPUT_SPEC = QuantSpec.for_activations(8)


def _ops(layer) -> QuantizedOps:
  return QuantizedOps(
    scope=layer.scope,
    weight_spec=layer.weight_spec,
    input_spec=layer.input_spec,
    mode=layer.mode,
    weight_estimator=layer.weight_estimator,
  )


class QuantDense(nn.Dense):
  """``nn.Dense`` with fake-quantized input and kernel (per output channel by default)."""

  weight_spec: QuantSpec | None = DEFAULT_WEIGHT_SPEC
  input_spec: QuantSpec | None = DEFAULT_INPUT_SPEC
  mode: Mode = Mode.QUANTIZE
  weight_estimator: str = "minmax"

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return run_with_ops(self, nn.Dense, _ops(self), inputs)


class QuantDenseGeneral(nn.DenseGeneral):
  """``nn.DenseGeneral`` with fake-quantized input and kernel (per output channel by default)."""

  weight_spec: QuantSpec | None = DEFAULT_WEIGHT_SPEC
  input_spec: QuantSpec | None = DEFAULT_INPUT_SPEC
  mode: Mode = Mode.QUANTIZE
  weight_estimator: str = "minmax"

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return run_with_ops(self, nn.DenseGeneral, _ops(self), inputs)


class QuantConv(nn.Conv):
  """``nn.Conv`` with fake-quantized input and kernel (per output channel by default)."""

  weight_spec: QuantSpec | None = DEFAULT_WEIGHT_SPEC
  input_spec: QuantSpec | None = DEFAULT_INPUT_SPEC
  mode: Mode = Mode.QUANTIZE
  weight_estimator: str = "minmax"

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return run_with_ops(self, nn.Conv, _ops(self), inputs)
