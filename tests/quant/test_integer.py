"""Integer export: integer dtypes, quantize/dequantize, and the int32 reference path."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from efqat_jax.quant import (
  AccumulatorSpec,
  IntegerLayer,
  QuantSpec,
  apply_integer,
  dequantize,
  export_layer,
  fake_quant,
  granularity,
  int_dtype,
  integer_layer_arrays,
  quantize_to_int,
  ranges,
)

DENSE_DN = (((1,), (0,)), ((), ()))
W4 = QuantSpec.for_weights(4)  # per output channel (axis -1), grid [-7, 7]
A8 = QuantSpec.for_activations(8)  # unsigned asymmetric per tensor, grid [0, 255]


def _rng(seed):
  return np.random.default_rng(seed)


# Reference computations are jitted: one compile per shape is much cheaper than compiling every
# eager op. The eager integer path is still exercised (see the *_matches_eager tests).
_fake_quant = jax.jit(fake_quant, static_argnames=("spec", "grad_scale"))
_apply = jax.jit(apply_integer)


@functools.partial(jax.jit, static_argnames=("spec", "shrink"))
def _params(x, spec, shrink=1.0):
  """Min-max scale (and zero point) for ``x``, optionally with a narrower range to force clipping."""
  lo, hi = ranges.minmax(x, spec)
  return ranges.scale_and_zero_point(lo * shrink, hi * shrink, spec)


def _export(
  kernel,
  kernel_scale,
  weight_spec,
  input_scale,
  input_zero_point,
  input_spec,
  bias=None,
  **settings,
):
  """export_layer, jitted with the specs and op settings static."""
  fn = lambda k, ks, s, z, b: export_layer(k, ks, weight_spec, s, z, input_spec, b, **settings)
  return jax.jit(fn)(kernel, kernel_scale, input_scale, input_zero_point, bias)


def _np_quantize(x, s, z, spec):
  """Integer input computed independently, in numpy (float32 division, half-to-even rounding)."""
  x, s = np.asarray(x, np.float32), np.asarray(s, np.float32)
  z = 0.0 if z is None else np.round(np.asarray(z, np.float32))
  return np.clip(np.round(x / s) + z, spec.qmin, spec.qmax).astype(np.int64)


def _np_quantize_any(x, s, z, spec):
  blocks = np.asarray(granularity.to_blocks(jnp.asarray(x), spec))
  s_b = np.asarray(granularity.expand_param(jnp.asarray(s), spec, x.shape))
  z_b = None if z is None else np.asarray(granularity.expand_param(z, spec, x.shape))
  return _np_quantize(blocks, s_b, z_b, spec).reshape(x.shape)


def _same_pads(size, stride, window):
  out = -(-size // stride)
  total = max((out - 1) * stride + window - size, 0)
  return (total // 2, total - total // 2)


def _np_conv_nhwc_hwio(x, w, strides, pads, dilation, groups, pad_value):
  """int64 NHWC x HWIO convolution with explicit padding by ``pad_value``."""
  x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=pad_value)
  n, h, wd, _ = x.shape
  kh, kw, cin_g, cout = w.shape
  (s0, s1), (d0, d1) = strides, dilation
  oh = (h - (kh - 1) * d0 - 1) // s0 + 1
  ow = (wd - (kw - 1) * d1 - 1) // s1 + 1
  out = np.zeros((n, oh, ow, cout), np.int64)
  for a in range(kh):
    for b in range(kw):
      xs = x[:, a * d0 : a * d0 + (oh - 1) * s0 + 1 : s0, b * d1 : b * d1 + (ow - 1) * s1 + 1 : s1]
      xs = xs.reshape(n, oh, ow, groups, cin_g)
      wk = w[a, b].reshape(cin_g, groups, cout // groups)
      out += np.einsum("nhwgc,cgk->nhwgk", xs, wk).reshape(n, oh, ow, cout)
  return out


def _assert_close_to_output_scale(y, ref, rtol=1e-5):
  ref = np.asarray(ref)
  np.testing.assert_allclose(y, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


# --- int_dtype --------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("bits", "signed", "dtype"),
  [
    (2, True, np.int8),
    (4, False, np.uint8),
    (8, True, np.int8),
    (8, False, np.uint8),
    (9, True, np.int16),
    (12, False, np.uint16),
    (16, True, np.int16),
    (16, False, np.uint16),
  ],
)
def test_int_dtype(bits, signed, dtype):
  assert int_dtype(QuantSpec(bits=bits, signed=signed)) == np.dtype(dtype)


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("kind", ["signed", "narrow", "unsigned"])
def test_int_dtype_is_the_narrowest_that_holds_the_grid(bits, kind):
  spec = QuantSpec(bits=bits, signed=kind != "unsigned", narrow=kind == "narrow")
  info = np.iinfo(int_dtype(spec))
  assert info.min <= spec.qmin and spec.qmax <= info.max
  assert info.bits == (8 if bits <= 8 else 16)
  assert (info.min < 0) == spec.signed


# --- quantize_to_int / dequantize -------------------------------------------------------------


def test_quantize_to_int_concrete_values():
  q = quantize_to_int(
    jnp.array([0.26, -3.0, 100.0, 0.0]), jnp.float32(0.25), None, QuantSpec(bits=4)
  )
  assert q.dtype == jnp.int8
  np.testing.assert_array_equal(q, [1, -8, 7, 0])
  q = quantize_to_int(jnp.array([-5.0, -0.2, 0.0, 9.0]), jnp.float32(0.5), jnp.float32(3.0), A8)
  assert q.dtype == jnp.uint8
  np.testing.assert_array_equal(q, [0, 3, 3, 21])


@pytest.mark.parametrize(
  ("spec", "expected"),
  [
    (QuantSpec(bits=16, signed=False), [0, 65535, 40000]),
    (QuantSpec(bits=16), [-32768, 32767, 32767]),
    (QuantSpec(bits=9), [-256, 255, 255]),
    (QuantSpec(bits=8, signed=False), [0, 255, 255]),
  ],
)
def test_quantize_to_int_reaches_the_grid_ends_without_overflow(spec, expected):
  q = quantize_to_int(jnp.array([-1e6, 1e6, 40000.0]), jnp.float32(1.0), None, spec)
  assert q.dtype == int_dtype(spec)
  np.testing.assert_array_equal(np.asarray(q, np.int64), expected)


_ROUND_TRIP_CASES = [
  ("tensor_symmetric", QuantSpec(bits=4), (6, 5), 0.3, None),
  ("tensor_asymmetric", QuantSpec.for_activations(8), (6, 5), 0.02, 40.0),
  ("tensor_signed_asymmetric", QuantSpec(bits=5, symmetric=False), (6, 5), 0.2, -3.0),
  ("unsigned_16_bit", QuantSpec.for_activations(16), (6, 5), 1e-4, 30000.0),
  ("channel", QuantSpec.for_weights(3), (6, 5), "channel", None),
  ("group", QuantSpec(bits=4, granularity="group", axis=0, group_size=3), (6, 5), "group", None),
]


@pytest.mark.parametrize(
  ("spec", "shape", "s", "z"),
  [c[1:] for c in _ROUND_TRIP_CASES],
  ids=[c[0] for c in _ROUND_TRIP_CASES],
)
def test_dequantize_of_quantize_to_int_equals_fake_quant(spec, shape, s, z):
  rng = _rng(0)
  x = jnp.asarray(rng.uniform(-3, 3, size=shape).astype(np.float32))
  if isinstance(s, str):
    s, _ = _params(x, spec, shrink=0.7)  # per-channel / per-group scales, with clipping
  else:
    s = jnp.float32(s)
  z = None if z is None else jnp.float32(z)
  q = quantize_to_int(x, s, z, spec)
  assert q.dtype == int_dtype(spec)
  np.testing.assert_array_equal(np.asarray(q, np.int64), _np_quantize_any(x, s, z, spec))
  back = dequantize(q, s, z, spec)
  assert back.dtype == jnp.float32
  np.testing.assert_array_equal(back, fake_quant(x, s, z, spec=spec))


# --- dot_general ------------------------------------------------------------------------------


def _dense_case(seed=0, batch=4, in_f=16, out_f=5, input_spec=A8):
  rng = _rng(seed)
  x = (rng.normal(size=(batch, in_f)) * 2.0 + 0.7).astype(np.float32)
  w = (rng.normal(size=(in_f, out_f)) * np.geomspace(0.05, 4.0, out_f)).astype(np.float32)
  b = rng.normal(size=out_f).astype(np.float32)
  s_w, _ = _params(w, W4)
  s_x, z_x = _params(x, input_spec, shrink=0.8)  # some inputs clip
  return x, w, b, s_w, s_x, z_x


# Negating the kernel flips the sign of every accumulator, so one of the two signs has its largest
# magnitude at a negative accumulator: both must report max |acc|.
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["kernel", "negated_kernel"])
def test_dense_reproduces_fake_quantized_matmul_and_reports_the_accumulator(sign):
  x, w, b, s_w, s_x, z_x = _dense_case()
  w = sign * w
  layer = export_layer(
    w, s_w, W4, s_x, z_x, A8, bias=b, op="dot_general", dimension_numbers=DENSE_DN
  )
  assert layer.weight.dtype == jnp.int8 and layer.input_zero_point.dtype == jnp.int32
  assert int(layer.input_zero_point) == int(z_x) and int(z_x) > 0
  w_int = _np_quantize(w, np.asarray(s_w)[None, :], None, W4)
  np.testing.assert_array_equal(np.asarray(layer.weight, np.int64), w_int)

  y, acc_max = apply_integer(layer, x)
  x_hat = _fake_quant(x, s_x, z_x, spec=A8)
  w_hat = _fake_quant(w, s_w, spec=W4)
  ref = jnp.matmul(x_hat, w_hat, precision="highest") + b
  assert y.shape == (4, 5) and y.dtype == jnp.float32
  _assert_close_to_output_scale(y, ref)

  x_int = _np_quantize(x, s_x, z_x, A8)
  assert x_int.min() == 0 and x_int.max() == 255  # inputs clip at both ends
  assert int(acc_max) == np.abs(x_int @ w_int).max()


def test_dense_under_jit_matches_eager():
  x, w, b, s_w, s_x, z_x = _dense_case(seed=1)
  layer = _export(w, s_w, W4, s_x, z_x, A8, bias=b, op="dot_general", dimension_numbers=DENSE_DN)
  chex.assert_trees_all_close(_apply(layer, x), apply_integer(layer, x), rtol=1e-6)


def test_dense_with_symmetric_signed_inputs_and_per_tensor_weights():
  spec_x, spec_w = QuantSpec(bits=8), QuantSpec(bits=6)
  x, w, _, _, _, _ = _dense_case(seed=2)
  s_x, z_x = _params(x, spec_x)
  s_w, _ = _params(w, spec_w)
  assert z_x is None
  layer = _export(w, s_w, spec_w, s_x, None, spec_x, op="dot_general", dimension_numbers=DENSE_DN)
  y, acc_max = _apply(layer, x)
  ref = _fake_quant(x, s_x, spec=spec_x) @ _fake_quant(w, s_w, spec=spec_w)
  _assert_close_to_output_scale(y, ref)
  x_int, w_int = _np_quantize(x, s_x, None, spec_x), np.asarray(layer.weight, np.int64)
  assert int(acc_max) == np.abs(x_int @ w_int).max()


def test_dense_on_a_3d_input():
  rng = _rng(3)
  x = rng.normal(size=(2, 3, 8)).astype(np.float32)
  w = rng.normal(size=(8, 4)).astype(np.float32)
  s_w, _ = _params(w, W4)
  s_x, z_x = _params(x, A8)
  layer = _export(
    w, s_w, W4, s_x, z_x, A8, op="dot_general", dimension_numbers=(((2,), (0,)), ((), ()))
  )
  y, acc_max = _apply(layer, x)
  ref = _fake_quant(x, s_x, z_x, spec=A8) @ _fake_quant(w, s_w, spec=W4)
  assert y.shape == (2, 3, 4)
  _assert_close_to_output_scale(y, ref)
  x_int = _np_quantize(x, s_x, z_x, A8)
  assert int(acc_max) == np.abs(x_int @ np.asarray(layer.weight, np.int64)).max()


def test_dense_with_weight_scales_on_the_input_axis_raises():
  x, w, _, _, s_x, z_x = _dense_case(seed=4)
  spec_w = QuantSpec.for_weights(4, axis=0)
  s_w, _ = _params(w, spec_w)
  layer = _export(w, s_w, spec_w, s_x, z_x, A8, op="dot_general", dimension_numbers=DENSE_DN)
  with pytest.raises(ValueError, match="output channel"):
    _apply(layer, x)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["kernel", "negated_kernel"])
@pytest.mark.parametrize("input_spec", [A8, QuantSpec(bits=8)], ids=["asymmetric", "symmetric"])
def test_group_wise_weights_reproduce_fake_quantized_matmul(input_spec, sign):
  spec_w = QuantSpec(bits=4, narrow=True, granularity="group", axis=0, group_size=4)
  x, w, b, _, s_x, z_x = _dense_case(seed=5, input_spec=input_spec)
  w = sign * w
  s_w, _ = _params(w, spec_w)
  assert s_w.shape == (4, 5)
  layer = _export(
    w, s_w, spec_w, s_x, z_x, input_spec, bias=b, op="dot_general", dimension_numbers=DENSE_DN
  )
  y, acc_max = _apply(layer, x)
  ref = _fake_quant(x, s_x, z_x, spec=input_spec) @ _fake_quant(w, s_w, spec=spec_w) + b
  _assert_close_to_output_scale(y, ref)
  # One accumulator per group of 4 input features.
  x_int = _np_quantize(x, s_x, z_x, input_spec)
  w_int = np.asarray(layer.weight, np.int64)
  np.testing.assert_array_equal(w_int, _np_quantize_any(w, s_w, None, spec_w))
  per_group = [x_int[:, g : g + 4] @ w_int[g : g + 4] for g in range(0, 16, 4)]
  assert int(acc_max) == max(np.abs(p).max() for p in per_group)


def test_group_wise_weights_on_an_output_axis_raise():
  spec_w = QuantSpec(bits=4, granularity="group", axis=1, group_size=5)
  x, w, _, _, s_x, z_x = _dense_case(seed=6)
  s_w, _ = _params(w, spec_w)
  layer = _export(w, s_w, spec_w, s_x, z_x, A8, op="dot_general", dimension_numbers=DENSE_DN)
  with pytest.raises(ValueError, match="group"):
    _apply(layer, x)


def test_weight_only_dense_matches_float_input_times_fake_quantized_weights():
  x, w, b, s_w, _, _ = _dense_case(seed=7)
  layer = _export(
    w, s_w, W4, None, None, None, bias=b, op="dot_general", dimension_numbers=DENSE_DN
  )
  assert layer.input_scale is None and layer.input_zero_point is None
  y, acc_max = _apply(layer, x)
  ref = jnp.matmul(x, _fake_quant(w, s_w, spec=W4), precision="highest") + b
  _assert_close_to_output_scale(y, ref)
  assert int(acc_max) == 0


# --- conv -------------------------------------------------------------------------------------

_CONV_CASES = [
  # name, x shape (NHWC), kernel (HWIO), strides, dilation, feature groups
  ("same_stride2", (2, 8, 7, 3), (3, 3, 3, 4), (2, 2), (1, 1), 1),
  ("depthwise_same_stride2", (2, 8, 7, 3), (3, 3, 1, 6), (2, 2), (1, 1), 3),
  ("dilated_same", (1, 6, 6, 2), (3, 2, 2, 3), (1, 1), (2, 2), 1),
  ("grouped", (1, 5, 6, 4), (2, 3, 2, 4), (1, 2), (1, 1), 2),
]


def _conv_case(x_shape, k_shape, seed):
  rng = _rng(seed)
  x = (rng.normal(size=x_shape) + 0.8).astype(np.float32)
  w = (rng.normal(size=k_shape) * np.geomspace(0.1, 2.0, k_shape[-1])).astype(np.float32)
  b = rng.normal(size=k_shape[-1]).astype(np.float32)
  s_w, _ = _params(w, W4)
  s_x, z_x = _params(x, A8, shrink=0.9)
  return x, w, b, s_w, s_x, z_x


def _nhwc(x, w):
  return lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))


def _export_conv(x, w, s_w, s_x, z_x, *, strides=(1, 1), padding="SAME", bias=None, **kw):
  """An NHWC x HWIO conv exported at W4 (per output channel) and A8, undilated by default."""
  weight_spec, input_spec = kw.pop("weight_spec", W4), kw.pop("input_spec", A8)
  kw.setdefault("rhs_dilation", (1, 1))
  settings = dict(
    op="conv", dimension_numbers=_nhwc(x, w), window_strides=strides, padding=padding, **kw
  )
  return _export(w, s_w, weight_spec, s_x, z_x, input_spec, bias=bias, **settings)


def _np_accumulator(x, layer, s_x, z_x, strides, pads):
  """The int64 accumulator of an undilated, ungrouped exported conv on float input ``x``."""
  weight = np.asarray(layer.weight, np.int64)
  x_int = _np_quantize(x, s_x, z_x, A8)
  return _np_conv_nhwc_hwio(x_int, weight, strides, pads, (1, 1), 1, pad_value=int(z_x))


@pytest.mark.parametrize(
  ("x_shape", "k_shape", "strides", "dilation", "groups"),
  [c[1:] for c in _CONV_CASES],
  ids=[c[0] for c in _CONV_CASES],
)
def test_conv_same_padding_reproduces_fake_quantized_conv(
  x_shape, k_shape, strides, dilation, groups
):
  x, w, b, s_w, s_x, z_x = _conv_case(x_shape, k_shape, seed=sum(x_shape))
  assert int(z_x) > 10  # a zero point far from 0, so padding with 0 instead would show
  dn = _nhwc(x, w)
  grouping = dict(rhs_dilation=dilation, feature_group_count=groups)
  layer = _export_conv(x, w, s_w, s_x, z_x, strides=strides, bias=b, **grouping)
  y, acc_max = _apply(layer, x)

  x_hat = _fake_quant(jnp.asarray(x), s_x, z_x, spec=A8)
  w_hat = _fake_quant(jnp.asarray(w), s_w, spec=W4)
  ref = (
    lax.conv_general_dilated(
      x_hat,
      w_hat,
      strides,
      "SAME",
      rhs_dilation=dilation,
      dimension_numbers=dn,
      feature_group_count=groups,
      precision="highest",
    )
    + b
  )
  assert y.shape == ref.shape
  _assert_close_to_output_scale(y, ref)

  # The raw accumulator: integer input padded with the zero point (the integer image of 0.0).
  window = [(k - 1) * d + 1 for k, d in zip(k_shape[:2], dilation, strict=True)]
  pads = [_same_pads(n, s, k) for n, s, k in zip(x_shape[1:3], strides, window, strict=True)]
  x_int = _np_quantize(x, s_x, z_x, A8)
  acc = _np_conv_nhwc_hwio(
    x_int, np.asarray(layer.weight, np.int64), strides, pads, dilation, groups, pad_value=int(z_x)
  )
  assert acc.shape == y.shape
  assert int(acc_max) == np.abs(acc).max()
  # Cross-check the helper: the centred accumulator rescaled is the output.
  w_zero_sum = _np_conv_nhwc_hwio(
    np.full_like(x_int, int(z_x)),
    np.asarray(layer.weight, np.int64),
    strides,
    pads,
    dilation,
    groups,
    pad_value=int(z_x),
  )
  centred = (acc - w_zero_sum).astype(np.float64) * float(s_x) * np.asarray(s_w, np.float64)
  _assert_close_to_output_scale(np.asarray(y) - b, centred)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["kernel", "negated_kernel"])
def test_conv_reports_the_largest_accumulator_magnitude_for_either_kernel_sign(sign):
  x, w, _, s_w, s_x, z_x = _conv_case((1, 6, 5, 2), (3, 3, 2, 3), seed=16)
  w = sign * w
  layer = _export_conv(x, w, s_w, s_x, z_x)
  _, acc_max = _apply(layer, x)
  acc = _np_accumulator(x, layer, s_x, z_x, (1, 1), [(1, 1), (1, 1)])
  assert int(acc_max) == np.abs(acc).max()


def test_conv_padding_uses_the_zero_point_not_integer_zero():
  # Float zero padding is zero-point padding in the integer domain. Padding with integer 0 would
  # pad with the float value -z * s_x instead, which visibly changes a corner output.
  x, w, _, s_w, s_x, z_x = _conv_case((1, 4, 4, 1), (3, 3, 1, 2), seed=11)
  dn = _nhwc(x, w)
  layer = _export_conv(x, w, s_w, s_x, z_x)
  y, _ = _apply(layer, x)
  x_hat = _fake_quant(jnp.asarray(x), s_x, z_x, spec=A8)
  w_hat = _fake_quant(jnp.asarray(w), s_w, spec=W4)
  ref = lax.conv_general_dilated(x_hat, w_hat, (1, 1), "SAME", dimension_numbers=dn)
  # What padding with integer 0 (float -z * s_x) would give instead:
  wrong = lax.conv_general_dilated(
    jnp.pad(x_hat, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-float(z_x) * float(s_x)),
    w_hat,
    (1, 1),
    "VALID",
    dimension_numbers=dn,
  )
  corner = (0, 0, 0)
  assert abs(float(ref[0][corner] - wrong[0][corner])) > 0.1
  np.testing.assert_allclose(y[0][corner], ref[0][corner], rtol=1e-5, atol=1e-5)
  _assert_close_to_output_scale(y, ref)


def test_conv_nchw_oihw_layout_matches_nhwc_hwio():
  x, w, b, s_w, s_x, z_x = _conv_case((2, 6, 5, 3), (3, 3, 3, 4), seed=17)
  settings = dict(window_strides=(2, 1), padding="SAME", rhs_dilation=(1, 1))
  y_nhwc, acc_nhwc = _apply(_export_conv(x, w, s_w, s_x, z_x, strides=(2, 1)), x)
  x_t, w_t = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)
  dn_t = lax.conv_dimension_numbers(x_t.shape, w_t.shape, ("NCHW", "OIHW", "NCHW"))
  spec_t = QuantSpec.for_weights(4, axis=0)  # output channels are axis 0 of OIHW
  layer = _export(w_t, s_w, spec_t, s_x, z_x, A8, op="conv", dimension_numbers=dn_t, **settings)
  y_nchw, acc_nchw = _apply(layer, x_t)
  np.testing.assert_allclose(y_nchw, np.asarray(y_nhwc).transpose(0, 3, 1, 2), rtol=1e-6, atol=1e-6)
  assert int(acc_nchw) == int(acc_nhwc)


def test_conv_with_explicit_padding():
  x, w, b, s_w, s_x, z_x = _conv_case((1, 5, 5, 2), (3, 3, 2, 3), seed=12)
  pads = ((2, 0), (1, 2))
  layer = _export_conv(x, w, s_w, s_x, z_x, strides=(1, 2), padding=pads, bias=b)
  y, acc_max = _apply(layer, x)
  x_hat = _fake_quant(jnp.asarray(x), s_x, z_x, spec=A8)
  w_hat = _fake_quant(jnp.asarray(w), s_w, spec=W4)
  ref = lax.conv_general_dilated(x_hat, w_hat, (1, 2), pads, dimension_numbers=_nhwc(x, w)) + b
  _assert_close_to_output_scale(y, ref)
  acc = _np_accumulator(x, layer, s_x, z_x, (1, 2), pads)
  assert int(acc_max) == np.abs(acc).max()


def test_conv_under_jit_matches_eager():
  x, w, b, s_w, s_x, z_x = _conv_case((1, 6, 6, 2), (3, 3, 2, 3), seed=13)
  layer = _export_conv(x, w, s_w, s_x, z_x, strides=(2, 2), bias=b)
  chex.assert_trees_all_close(_apply(layer, x), apply_integer(layer, x), rtol=1e-6)


def test_weight_only_conv_matches_float_conv_with_fake_quantized_weights():
  x, w, b, s_w, _, _ = _conv_case((2, 8, 7, 3), (3, 3, 3, 4), seed=14)
  layer = _export_conv(x, w, s_w, None, None, strides=(2, 2), bias=b, input_spec=None)
  y, acc_max = _apply(layer, x)
  ref = (
    lax.conv_general_dilated(
      jnp.asarray(x),
      _fake_quant(jnp.asarray(w), s_w, spec=W4),
      (2, 2),
      "SAME",
      dimension_numbers=_nhwc(x, w),
      precision="highest",
    )
    + b
  )
  _assert_close_to_output_scale(y, ref)
  assert int(acc_max) == 0


def test_conv_with_group_wise_weights_raises():
  spec_w = QuantSpec(bits=4, granularity="group", axis=2, group_size=3)
  x, w, _, _, s_x, z_x = _conv_case((1, 4, 4, 3), (3, 3, 3, 2), seed=15)
  s_w, _ = _params(w, spec_w)
  layer = _export_conv(x, w, s_w, s_x, z_x, weight_spec=spec_w)
  with pytest.raises(ValueError, match="group"):
    _apply(layer, x)


# --- IntegerLayer validation ------------------------------------------------------------------


def _layer_kwargs(**overrides):
  kwargs = dict(
    weight=jnp.zeros((4, 2), jnp.int8),
    weight_scale=jnp.ones(2),
    input_scale=jnp.float32(0.1),
    input_zero_point=jnp.int32(3),
    bias=None,
    weight_spec=W4,
    input_spec=A8,
    op="dot_general",
    dimension_numbers=DENSE_DN,
  )
  return kwargs | overrides


def test_integer_layer_accepts_a_valid_layer():
  layer = IntegerLayer(**_layer_kwargs())
  y, acc = _apply(layer, jnp.ones((1, 4)))
  np.testing.assert_array_equal(y, np.zeros((1, 2), np.float32))
  assert int(acc) == 0


@pytest.mark.parametrize(
  "input_spec",
  [
    QuantSpec.for_activations(8, granularity="channel", axis=-1),
    QuantSpec.for_activations(8, granularity="group", axis=-1, group_size=2),
  ],
  ids=["channel", "group"],
)
def test_integer_layer_rejects_a_non_per_tensor_input_spec(input_spec):
  with pytest.raises(ValueError, match="per-tensor"):
    IntegerLayer(**_layer_kwargs(input_spec=input_spec))
  with pytest.raises(ValueError, match="per-tensor"):
    export_layer(
      jnp.ones((4, 2)),
      jnp.ones(2),
      W4,
      jnp.ones(4),
      jnp.zeros(4),
      input_spec,
      op="dot_general",
      dimension_numbers=DENSE_DN,
    )


@pytest.mark.parametrize("op", ["matmul", "conv2d", "", None])
def test_integer_layer_rejects_an_unknown_op(op):
  with pytest.raises(ValueError, match="op"):
    IntegerLayer(**_layer_kwargs(op=op))


def test_integer_layer_is_a_pytree_with_static_settings():
  layer = IntegerLayer(**_layer_kwargs(bias=jnp.zeros(2)))
  leaves = jax.tree.leaves(layer)
  assert len(leaves) == 5  # weight, weight_scale, input_scale, input_zero_point, bias
  doubled = jax.tree.map(lambda t: t * 2, layer)
  assert doubled.op == "dot_general" and doubled.input_spec == A8
  np.testing.assert_array_equal(doubled.weight_scale, [2.0, 2.0])


def test_formats_and_arrays_of_a_layer_with_quantized_inputs():
  layer = IntegerLayer(**_layer_kwargs(bias=jnp.ones(2)))
  assert layer.formats() == dict(
    weight_bits=4, weight_signed=1, weight_narrow=1, input_bits=8, input_signed=0, input_narrow=0
  )
  arrays = integer_layer_arrays(layer)
  kernel = {"op", "kernel_output_axes", "kernel_input_axes"}
  inputs = {"input_min", "input_max"}
  assert (
    set(arrays)
    == {"weight", "weight_scale", "input_scale", "input_zero_point", "bias"}
    | set(layer.formats())
    | kernel
    | inputs
  )
  assert all(isinstance(v, np.ndarray) for v in arrays.values())
  assert arrays["weight"].dtype == np.int8 and int(arrays["input_zero_point"]) == 3
  assert arrays["weight_bits"].shape == () and arrays["weight_bits"].dtype == np.int32
  assert str(arrays["op"]) == "dot_general"
  assert list(arrays["kernel_output_axes"]) == [1] and list(arrays["kernel_input_axes"]) == [0]
  assert (int(arrays["input_min"]), int(arrays["input_max"])) == (0, 255)  # unsigned 8-bit grid
  tiled = integer_layer_arrays(layer, AccumulatorSpec(bits=14, tile=8, order="chw"))
  assert set(tiled) - set(arrays) == {"accumulator_bits", "accumulator_tile", "accumulation_order"}
  assert (int(tiled["accumulator_bits"]), int(tiled["accumulator_tile"])) == (14, 8)
  assert str(tiled["accumulation_order"]) == "chw"
  whole = integer_layer_arrays(layer, AccumulatorSpec(bits=14))
  assert int(whole["accumulator_tile"]) == layer.weight.shape[0]  # one accumulator: the row


def test_arrays_of_an_unsigned_weight_only_layer_record_what_they_hold():
  spec = QuantSpec(bits=4, signed=False, granularity="channel", axis=-1)
  kernel = jnp.asarray(_rng(9).uniform(0, 3, (4, 2)), jnp.float32)
  layer = _export(
    kernel, jnp.full(2, 0.1), spec, None, None, None, op="dot_general", dimension_numbers=DENSE_DN
  )
  arrays = integer_layer_arrays(layer)
  kernel = {"op", "kernel_output_axes", "kernel_input_axes"}  # no integer inputs: no input range
  assert set(arrays) == {
    "weight", "weight_scale", "weight_bits", "weight_signed", "weight_narrow"
  } | kernel  # fmt: skip
  assert (int(arrays["weight_bits"]), int(arrays["weight_signed"])) == (4, 0)
  assert arrays["weight"].dtype == np.uint8
  assert arrays["weight"].min() >= 0 and arrays["weight"].max() == 2**4 - 1  # clipped above 1.5


def test_integer_layer_rejects_an_asymmetric_weight_spec():
  asymmetric = QuantSpec(bits=4, signed=False, symmetric=False)
  with pytest.raises(ValueError, match="weight_spec must be symmetric"):
    IntegerLayer(**_layer_kwargs(weight_spec=asymmetric))


def test_conv_integer_layer_without_strides_raises_naming_them():
  dn = lax.conv_dimension_numbers((1, 4, 4, 3), (3, 3, 3, 2), ("NHWC", "HWIO", "NHWC"))
  kwargs = _layer_kwargs(weight=jnp.zeros((3, 3, 3, 2), jnp.int8), op="conv", dimension_numbers=dn)
  with pytest.raises(ValueError, match="window_strides"):
    IntegerLayer(**kwargs)
