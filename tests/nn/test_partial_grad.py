"""The leading-channels weight gradient: exact on the first k channels, zero after, cheaper HLO."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from efqat_jax.nn.partial_grad import leading_channels_grad

DENSE = lambda x, w: x @ w
CONV = functools.partial(
  lax.conv_general_dilated,
  window_strides=(1, 1),
  padding="SAME",
  dimension_numbers=("NHWC", "HWIO", "NHWC"),
)
CASES = {
  "dense": (DENSE, (6, 10), (10, 8)),
  "conv": (CONV, (2, 7, 7, 3), (3, 3, 3, 8)),
}


def _grads(op, x, w, k, r):
  full = jax.grad(lambda x, w: jnp.sum(op(x, w) * r), argnums=(0, 1))(x, w)
  partial = jax.grad(lambda x, w: jnp.sum(leading_channels_grad(op, x, w, k) * r), argnums=(0, 1))(
    x, w
  )
  return full, partial


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("k", [0, 1, 3, 8])
def test_gradients_match_autodiff_on_the_first_k_channels_and_are_zero_after(name, k):
  op, x_shape, w_shape = CASES[name]
  keys = jax.random.split(jax.random.key(k), 3)
  x, w = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], w_shape)
  r = jax.random.normal(keys[2], jax.eval_shape(op, x, w).shape)
  (dx, dw), (dx_k, dw_k) = _grads(op, x, w, k, r)
  np.testing.assert_allclose(dx_k, dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw_k[..., :k], dw[..., :k], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(dw_k[..., k:], 0.0)
  np.testing.assert_allclose(leading_channels_grad(op, x, w, k), op(x, w), rtol=1e-6)


def test_weight_gradient_op_is_narrowed_to_k_channels_in_the_compiled_hlo():
  op, x_shape, w_shape = CASES["conv"]
  x, w = jnp.ones(x_shape), jnp.ones(w_shape)
  grad = jax.jit(jax.grad(lambda w: jnp.sum(leading_channels_grad(op, x, w, 2) ** 2)))
  hlo = grad.lower(w).compile().as_text()
  outputs = re.findall(r"= (f32\[[0-9,]*\])[^=]* convolution\(", hlo)
  assert "f32[3,3,3,2]" in outputs  # dW for 2 of 8 channels
  assert "f32[3,3,3,8]" not in outputs


def test_k_out_of_range_raises():
  with pytest.raises(ValueError, match="k must be in 0..8"):
    jax.grad(lambda w: jnp.sum(leading_channels_grad(DENSE, jnp.ones((2, 10)), w, 9)))(
      jnp.ones((10, 8))
    )
