"""The channel-subset weight gradient: exact on the chosen channels, zero on the others, and a
weight-gradient op narrowed to those channels in the compiled HLO."""

import functools
import re

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from jax import lax

from efqat_jax.nn import channel_subset_grad
from efqat_jax.nn.conv_weight_grad import LAYOUTS, conv_settings, cpu_layout

NHWC = ("NHWC", "HWIO", "NHWC")
DENSE = lambda x, w: x @ w
CONV = functools.partial(
  lax.conv_general_dilated,
  window_strides=(1, 1),
  padding="SAME",
  dimension_numbers=NHWC,
)
STRIDED = functools.partial(CONV, window_strides=(2, 2), padding="VALID")
POINTWISE = functools.partial(CONV, window_strides=(2, 1))
DEPTHWISE = functools.partial(CONV, feature_group_count=8)
HEADS = functools.partial(lax.dot_general, dimension_numbers=(((1,), (0,)), ((), ())))
# name: (op, x shape, kernel shape, output axes, depthwise)
CASES = {
  "dense": (DENSE, (6, 10), (10, 8), 1, False),
  "conv": (CONV, (2, 7, 7, 3), (3, 3, 3, 8), 1, False),
  "depthwise": (DEPTHWISE, (2, 7, 7, 8), (3, 3, 1, 8), 1, True),
  "heads": (HEADS, (6, 10), (10, 2, 4), 2, False),  # DenseGeneral: 2 heads x 4 = 8 channels
  # With their ConvSettings: on CPU a matmul for k <= 2 (3x2 taps, 16 inputs, stride 2), the
  # vjp above.
  "strided": (STRIDED, (2, 9, 8, 16), (3, 2, 16, 8), 1, False),
  "pointwise": (POINTWISE, (2, 7, 7, 5), (1, 1, 5, 8), 1, False),  # a matmul for every k
}
SETTINGS = {name: conv_settings(CASES[name][0]) for name in ("strided", "pointwise")}


def _check(name, channels):
  op, x_shape, w_shape, out_axes, depthwise = CASES[name]
  keys = jax.random.split(jax.random.key(len(channels)), 3)
  x, w = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], w_shape)
  r = jax.random.normal(keys[2], jax.eval_shape(op, x, w).shape)
  full = jax.grad(lambda x, w: jnp.sum(op(x, w) * r), argnums=(0, 1))(x, w)
  conv = SETTINGS.get(name)
  subset = lambda x, w: channel_subset_grad(op, x, w, channels, out_axes, depthwise, conv)
  dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(subset(x, w) * r), argnums=(0, 1)))(x, w)
  chosen = np.isin(np.arange(8), channels)  # 8: padding, no channel
  flat = lambda a: np.asarray(a).reshape(*a.shape[: a.ndim - out_axes], 8)
  np.testing.assert_allclose(dx, full[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    flat(dw)[..., chosen], flat(full[1])[..., chosen], rtol=1e-5, atol=1e-5
  )
  np.testing.assert_array_equal(flat(dw)[..., ~chosen], 0.0)
  np.testing.assert_allclose(subset(x, w), op(x, w), rtol=1e-6)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("channels", [[], [5], [6, 1, 3], [2, 8], [8, 4, 8], list(range(8))])
def test_gradients_match_autodiff_on_the_chosen_channels_and_are_zero_elsewhere(name, channels):
  _check(name, jnp.asarray(channels, jnp.int32))


@given(st.sampled_from(sorted(CASES)), st.sets(st.integers(0, 7), min_size=1))
def test_any_channel_subset_is_exact(name, channels):
  _check(name, jnp.asarray(sorted(channels), jnp.int32))


def test_weight_gradient_op_is_narrowed_to_the_chosen_channels_in_the_compiled_hlo():
  op, x_shape, w_shape, _, _ = CASES["conv"]
  x, w = jnp.ones(x_shape), jnp.ones(w_shape)
  loss = lambda w, c: jnp.sum(channel_subset_grad(op, x, w, c) ** 2)
  hlo = jax.jit(jax.grad(loss)).lower(w, jnp.array([6, 2], jnp.int32)).compile().as_text()
  outputs = re.findall(r"= (f32\[[0-9,]*\])[^=]* convolution\(", hlo)
  assert "f32[3,3,3,2]" in outputs  # dW for 2 of 8 channels
  assert "f32[3,3,3,8]" not in outputs


# (x shape, kernel shape, conv keywords): strides, SAME / VALID / explicit (negative) padding,
# non-square kernels, kernel dilation, channels-first layouts.
LAYOUT_CASES = [
  ((2, 9, 8, 6), (3, 2, 6, 4), dict(window_strides=(2, 2), padding="VALID")),
  ((2, 7, 6, 6), (2, 3, 6, 4), dict(window_strides=(2, 1), padding="SAME")),
  ((2, 8, 8, 6), (3, 3, 6, 4), dict(window_strides=(1, 3), padding=((2, 1), (0, -1)), rhs_dilation=(2, 1))),
  ((2, 7, 7, 6), (1, 1, 6, 4), dict(window_strides=(2, 2), padding="SAME")),
  ((2, 6, 7, 9), (4, 6, 3, 1), dict(window_strides=(1, 2), padding="SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))),
]  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_is_the_convolutions_weight_gradient(layout):
  for x_shape, w_shape, keywords in LAYOUT_CASES:
    op = functools.partial(lax.conv_general_dilated, **{"dimension_numbers": NHWC, **keywords})
    conv = conv_settings(op)
    window = [w_shape[d] for d in conv.numbers(x_shape, w_shape).rhs_spec[2:]]
    if layout == "pointwise_matmul" and window != [1, 1]:
      continue
    x, w = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate((x_shape, w_shape)))
    y, vjp = jax.vjp(functools.partial(op, x), w)
    g = jax.random.normal(jax.random.key(2), y.shape)
    got = jax.jit(LAYOUTS[layout], static_argnums=(2, 3))(x, g, w.shape, conv)
    np.testing.assert_allclose(got, vjp(g)[0], rtol=1e-5, atol=1e-5, err_msg=str(keywords))


def test_conv_settings_only_for_single_group_convolutions_without_input_dilation():
  assert conv_settings(functools.partial(CONV, feature_group_count=2)) is None
  assert conv_settings(functools.partial(CONV, lhs_dilation=(2, 2))) is None
  assert conv_settings(HEADS) is None
  settings = conv_settings(functools.partial(CONV, padding=[[1, 0], [0, 1]]))
  assert hash(settings) == hash(conv_settings(functools.partial(CONV, padding=((1, 0), (0, 1)))))


@pytest.mark.parametrize("name, k", [("strided", 2), ("strided", 6), ("pointwise", 2)])
def test_weight_gradient_is_lowered_in_the_layout_the_rule_picks_for_the_backend(name, k):
  """The vjp: a second convolution, with the k-channel dW as output. A matmul layout: the
  forward convolution only, and a dot of taps x k rows and the input channels as columns.
  (StableHLO, as lowered for the default backend: the same ops on every backend.)"""
  op, x_shape, w_shape, _, _ = CASES[name]
  x, w, conv = jnp.ones(x_shape), jnp.ones(w_shape), SETTINGS[name]
  loss = lambda w, c: jnp.sum(channel_subset_grad(op, x, w, c, 1, False, conv) ** 2)
  text = jax.jit(jax.grad(loss)).lower(w, jnp.arange(k, dtype=jnp.int32)).as_text()
  output = lambda kind: re.findall(rf"stablehlo\.{kind}.*-> tensor<([0-9x]*)xf32>", text)
  convolutions, dots = output("convolution"), output("dot_general")
  on_cpu = jax.default_backend() == "cpu"
  layout = cpu_layout(x_shape, (*w_shape[:-1], k), conv) if on_cpu else "vjp"
  if on_cpu:  # 3x2 taps x k against 16 inputs; a 1x1 kernel: always a matmul
    assert layout == {"strided": "patch_matmul" if k <= 2 else "vjp"}.get(name, "pointwise_matmul")
  taps, inputs = w_shape[0] * w_shape[1], w_shape[2]
  if layout == "vjp":
    assert len(convolutions) == 2 and not dots
    assert sorted(map(int, convolutions[1].split("x"))) == sorted((*w_shape[:-1], k))
  else:
    assert len(convolutions) == 1  # the forward
    assert dots == [f"{taps * k}x{inputs}"]
