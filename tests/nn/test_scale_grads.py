"""LSQ gradients of the quantization params of the quantized layers, against a hand composition.

The reference is written with the framework-free ``fake_quant`` and ``lsq_grad_scale`` and
spells every gradient scale out from the shapes: the input quantizer counts the entries per
scale of one example (``x.size // batch``), the kernel quantizer the entries per output channel.
Several batch sizes make the per-example count matter; the quantization params are shrunk from
their min-max init so that inputs and weights clip and every param gets a non-zero gradient.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

import efqat_jax
from efqat_jax.nn import QuantConv, QuantDense
from efqat_jax.quant import QuantSpec, fake_quant, lsq_grad_scale

W4 = QuantSpec.for_weights(4)
A4 = QuantSpec.for_activations(4)
W8 = QuantSpec.for_weights(8)
A8 = QuantSpec.for_activations(8)
BATCHES = (1, 3, 8)
SCALE_NAMES = ("kernel_scale", "input_scale", "input_zero_point")
GRAD_NAMES = ("kernel", "bias", *SCALE_NAMES)
CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def _quant_input(x, p, spec):
  """The input quantizer as the layer runs it: LSQ scale counted per example."""
  grad_scale = lsq_grad_scale(spec, x.size // x.shape[0])
  return fake_quant(x, p["input_scale"], p["input_zero_point"], spec=spec, grad_scale=grad_scale)


def _quant_kernel(w, p, spec):
  """Per-output-channel kernel quantizer (output channels on the last axis)."""
  spec = dataclasses.replace(spec, axis=w.ndim - 1)
  grad_scale = lsq_grad_scale(spec, w.size // w.shape[-1])
  return fake_quant(w, p["kernel_scale"], spec=spec, grad_scale=grad_scale)


def _dense_ref(p, x, w_spec, a_spec):
  return _quant_input(x, p, a_spec) @ _quant_kernel(p["kernel"], p, w_spec) + p["bias"]


def _conv_ref(p, x, w_spec, a_spec, strides=(1, 1)):
  y = jax.lax.conv_general_dilated(
    _quant_input(x, p, a_spec),
    _quant_kernel(p["kernel"], p, w_spec),
    window_strides=strides,
    padding="SAME",
    dimension_numbers=CONV_DIMS,
  )
  return y + p["bias"]


def _shrink(params):
  """Quantization params moved off their min-max init so that some inputs and weights clip."""

  def move(path, v):
    name = path[-1].key
    if name in ("kernel_scale", "input_scale"):
      return v * 0.6
    if name == "input_zero_point":
      return v + 1.0
    return v

  return jax.tree_util.tree_map_with_path(move, params)


def _grads(apply, params, x, cotangent):
  """Gradients of ``sum(apply(params, x) * cotangent)`` w.r.t. x and the float params we check."""
  flat = flatten_dict(params)
  diff = {k: v for k, v in flat.items() if k[-1] in GRAD_NAMES}
  rest = {k: v for k, v in flat.items() if k[-1] not in GRAD_NAMES}
  loss = lambda d, x: jnp.sum(apply(unflatten_dict({**rest, **d}), x) * cotangent)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(diff, x)


def _check(layer_apply, ref_apply, params, x):
  """Layer and reference agree on every param gradient (and the input's) to float rounding."""
  out_shape = jax.eval_shape(ref_apply, params, x).shape
  assert jax.eval_shape(layer_apply, params, x).shape == out_shape
  cotangent = jax.random.normal(jax.random.key(7), out_shape)
  want_p, want_x = _grads(ref_apply, params, x, cotangent)
  got_p, got_x = _grads(layer_apply, params, x, cotangent)
  want = {"/".join(k): v for k, v in want_p.items()} | {"input": want_x}
  got = {"/".join(k): v for k, v in got_p.items()} | {"input": got_x}
  assert got.keys() == want.keys()
  scale_grads = [k for k in want if k.rsplit("/", 1)[-1] in SCALE_NAMES]
  assert {k.rsplit("/", 1)[-1] for k in scale_grads} == set(SCALE_NAMES)
  for k in scale_grads:
    assert np.any(want[k] != 0), f"{k}: a zero gradient would test nothing"
  differ = [
    f"{k} (layer / reference: {np.ravel(got[k] / jnp.where(want[k] == 0, 1, want[k]))[:3]})"
    for k in want
    if not np.allclose(got[k], want[k], rtol=1e-5, atol=1e-7)
  ]
  assert not differ, "gradients differ: " + "; ".join(differ)


@pytest.mark.parametrize("batch", BATCHES)
def test_quant_dense_scale_grads_match_hand_composition(batch):
  x = jax.random.normal(jax.random.key(batch), (batch, 8)) + 0.5
  layer = QuantDense(5, weight_spec=W4, input_spec=A4)
  params = _shrink(jax.jit(layer.init)(jax.random.key(0), x)["params"])
  _check(
    lambda p, x: layer.apply({"params": p}, x),
    lambda p, x: _dense_ref(p, x, W4, A4),
    params,
    x,
  )


@pytest.mark.parametrize("batch", BATCHES)
def test_quant_conv_scale_grads_match_hand_composition(batch):
  x = jax.random.normal(jax.random.key(batch), (batch, 6, 6, 3)) + 0.5
  layer = QuantConv(4, (3, 3), strides=2, weight_spec=W4, input_spec=A4)
  params = _shrink(jax.jit(layer.init)(jax.random.key(0), x)["params"])
  _check(
    lambda p, x: layer.apply({"params": p}, x),
    lambda p, x: _conv_ref(p, x, W4, A4, strides=(2, 2)),
    params,
    x,
  )


class _CNN(nn.Module):
  """Plain Flax: conv, gelu, global mean, dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def _cnn_ref(p, x):
  h = jax.nn.gelu(_conv_ref(p["Conv_0"], x, W8, A8))
  return _dense_ref(p["Dense_0"], h.mean(axis=(1, 2)), W4, A4)


@pytest.mark.parametrize("batch", BATCHES)
def test_quantized_model_scale_grads_match_hand_composition(batch):
  x = jax.random.normal(jax.random.key(batch), (batch, 5, 5, 2)) + 0.5
  rules = [
    efqat_jax.QuantRule("Conv_0", weight=W8, input=A8),
    efqat_jax.QuantRule(".*", weight=W4, input=A4),
  ]
  qmodel = efqat_jax.quantize(_CNN(), rules)
  params = _shrink(jax.jit(qmodel.init)(jax.random.key(0), x)["params"])
  _check(lambda p, x: qmodel.apply({"params": p}, x), _cnn_ref, params, x)
