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

DENSE = lambda x, w: x @ w
CONV = functools.partial(
  lax.conv_general_dilated,
  window_strides=(1, 1),
  padding="SAME",
  dimension_numbers=("NHWC", "HWIO", "NHWC"),
)
DEPTHWISE = functools.partial(CONV, feature_group_count=8)
HEADS = functools.partial(lax.dot_general, dimension_numbers=(((1,), (0,)), ((), ())))
# name: (op, x shape, kernel shape, output axes, depthwise)
CASES = {
  "dense": (DENSE, (6, 10), (10, 8), 1, False),
  "conv": (CONV, (2, 7, 7, 3), (3, 3, 3, 8), 1, False),
  "depthwise": (DEPTHWISE, (2, 7, 7, 8), (3, 3, 1, 8), 1, True),
  "heads": (HEADS, (6, 10), (10, 2, 4), 2, False),  # DenseGeneral: 2 heads x 4 = 8 channels
}


def _check(name, channels):
  op, x_shape, w_shape, out_axes, depthwise = CASES[name]
  keys = jax.random.split(jax.random.key(len(channels)), 3)
  x, w = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], w_shape)
  r = jax.random.normal(keys[2], jax.eval_shape(op, x, w).shape)
  full = jax.grad(lambda x, w: jnp.sum(op(x, w) * r), argnums=(0, 1))(x, w)
  subset = lambda x, w: channel_subset_grad(op, x, w, channels, out_axes, depthwise)
  dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(subset(x, w) * r), argnums=(0, 1)))(x, w)
  chosen = np.zeros(8, bool)
  chosen[np.asarray(channels)] = True
  flat = lambda a: np.asarray(a).reshape(*a.shape[: a.ndim - out_axes], 8)
  np.testing.assert_allclose(dx, full[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    flat(dw)[..., chosen], flat(full[1])[..., chosen], rtol=1e-5, atol=1e-5
  )
  np.testing.assert_array_equal(flat(dw)[..., ~chosen], 0.0)
  np.testing.assert_allclose(subset(x, w), op(x, w), rtol=1e-6)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("channels", [[], [5], [6, 1, 3], list(range(8))])
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
