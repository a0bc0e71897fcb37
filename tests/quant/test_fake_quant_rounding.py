"""fake_quant's ``rounding`` argument: the default is today's quantizer bit for bit, and a custom
rounding replaces ``round`` before the clip, with gradients by autodiff through it."""

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from efqat_jax.quant import QuantSpec, fake_quant, granularity, lsq_grad_scale, round_ste

S4 = QuantSpec(bits=4)  # grid [-8, 7]


def _with_rounding(rounding):
  def quantizer(x, s, z, spec, grad_scale):
    return fake_quant(x, s, z, spec=spec, grad_scale=grad_scale, rounding=rounding)

  return quantizer


@functools.partial(jax.jit, static_argnames=("spec", "quantizer"))
def _value_and_grads(x, s, z, g, *, spec, quantizer):
  """``quantizer(x, s, z)`` and the gradients of ``sum(g * quantizer(...))`` wrt x, s and z."""
  grad_scale = lsq_grad_scale(spec, granularity.elements_per_param(spec, x.shape))
  f = lambda x, s, z: quantizer(x, s, None if spec.symmetric else z, spec, grad_scale)
  out, vjp = jax.vjp(f, x, s, z)
  return out, vjp(g)


_DEFAULT, _STE = _with_rounding(None), _with_rounding(round_ste)


# --- the custom path agrees with the default ----------------------------------------------------

_SPECS = [
  QuantSpec(bits=2),
  QuantSpec(bits=4),
  QuantSpec(bits=8),
  QuantSpec(bits=4, narrow=True),
  QuantSpec(bits=4, signed=False),
  QuantSpec(bits=3, symmetric=False),
  QuantSpec.for_activations(4),
  QuantSpec(bits=4, learnable=False),
  QuantSpec(bits=4, granularity="channel", axis=0),
  QuantSpec(bits=3, symmetric=False, granularity="group", axis=1, group_size=2),
]


@st.composite
def _case(draw):
  spec = draw(st.sampled_from(_SPECS))
  shape = (3, 4)
  x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-10, 10, width=32)))
  # Cotangents of 0 or at least 1e-30 in magnitude: autodiff's (g * s) / s would flush a g near
  # float32's smallest normal (1.2e-38) to zero on backends that flush subnormals, the custom_vjp
  # would not, and the two paths are compared exactly where the gradient is zero.
  cotangents = st.floats(-2, 2, width=32).filter(lambda v: v == 0 or abs(v) >= 1e-30)
  g = draw(hnp.arrays(np.float32, shape, elements=cotangents))
  pshape = granularity.param_shape(spec, shape)
  s = draw(hnp.arrays(np.float32, pshape, elements=st.floats(0.015625, 4.0, width=32)))
  z = np.zeros(pshape, np.float32)
  if not spec.symmetric:
    z = draw(hnp.arrays(np.float32, pshape, elements=st.integers(spec.qmin, spec.qmax).map(float)))
  return spec, x, s, z, g


@given(_case())
def test_property_custom_path_with_ste_round_computes_the_default(case):
  # The autodiff composition with round_ste reproduces the custom_vjp: the same forward bit for
  # bit, the same gradients up to float rounding (autodiff computes d/dx as (g * s) / s, and
  # sums the scale gradient in another order).
  spec, x, s, z, g = case
  want_out, want_grads = _value_and_grads(x, s, z, g, spec=spec, quantizer=_DEFAULT)
  out, grads = _value_and_grads(x, s, z, g, spec=spec, quantizer=_STE)
  np.testing.assert_array_equal(out, want_out)
  chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grads[0] != 0, want_grads[0] != 0)  # the same STE mask


def test_round_ste_rounds_half_to_even_with_derivative_one():
  u = jnp.array([-1.5, -0.5, 0.5, 1.5, 2.4])
  np.testing.assert_array_equal(round_ste(u), [-2.0, -0.0, 0.0, 2.0, 2.0])
  np.testing.assert_array_equal(jax.grad(lambda u: jnp.sum(round_ste(u)))(u), np.ones(5))


# --- a custom rounding ------------------------------------------------------------------------


def test_floor_rounding_forward_by_hand():
  # s = 0.5: u = [1.9, -0.2, 100, -100] -> floor [1, -1, 100, -100] -> clip to [-8, 7].
  x = jnp.array([0.95, -0.1, 50.0, -50.0])
  out = fake_quant(x, jnp.float32(0.5), spec=S4, rounding=jnp.floor)
  np.testing.assert_array_equal(out, [0.5, -0.5, 3.5, -4.0])


@given(
  hnp.arrays(np.float32, (12,), elements=st.floats(-10, 10, width=32)),
  st.floats(-50, 50, width=32),
  st.sampled_from([S4, QuantSpec(bits=3, symmetric=False), QuantSpec(bits=4, narrow=True)]),
)
def test_property_off_grid_rounding_is_still_clipped_into_range(x, shift, spec):
  s = jnp.float32(0.25)
  z = None if spec.symmetric else jnp.float32(2.0)
  zf = 0.0 if z is None else 2.0
  out = fake_quant(jnp.asarray(x), s, z, spec=spec, rounding=lambda u: 7.3 * u + shift)
  k = np.asarray(out, np.float64) / 0.25 + zf  # integer levels, off-grid where not clipped
  assert k.min() >= spec.qmin - 1e-4 and k.max() <= spec.qmax + 1e-4
  want = np.clip(7.3 * (np.asarray(x, np.float64) / 0.25) + shift + zf, spec.qmin, spec.qmax)
  np.testing.assert_allclose(k, want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("jit", [False, True])
def test_soft_rounding_gradients_flow_through_the_rounding_inside_the_range(jit):
  # rounding(u) = floor(u) + sigmoid(a): x_hat = s * (floor(x / s) + sigmoid(a)) inside the
  # range, so d/da = s * sigmoid'(a) and d/dx = 0 (floor's derivative); 0 for clipped entries.
  spec = QuantSpec(bits=4, learnable=False)
  x = jnp.array([0.3, -1.1, 0.9, 40.0])
  a = jnp.array([0.5, -1.0, 2.0, 0.1])
  s = jnp.float32(0.5)

  def loss(x, a):
    soft = lambda u: jnp.floor(u) + jax.nn.sigmoid(a)
    return jnp.sum(fake_quant(x, s, spec=spec, rounding=soft))

  grad = jax.grad(loss, argnums=(0, 1))
  dx, da = (jax.jit(grad) if jit else grad)(x, a)
  sig = jax.nn.sigmoid(a)
  np.testing.assert_allclose(da, 0.5 * sig * (1 - sig) * np.array([1, 1, 1, 0]), rtol=1e-6)
  np.testing.assert_array_equal(dx, np.zeros(4, np.float32))


def test_custom_rounding_weight_gradient_is_the_rounding_derivative():
  # rounding(u) = 0.5 * u: inside the range x_hat = s * 0.5 * x / s, so d/dx = 0.5, and
  # d/ds = rounding(u) - u * rounding'(u) = 0 (times the LSQ gradient scale); clipped: 0 and qmax.
  x = jnp.array([0.4, -1.0, 100.0])
  s = jnp.float32(0.5)
  dx, ds = jax.grad(
    lambda x, s: jnp.sum(fake_quant(x, s, spec=S4, grad_scale=1.0, rounding=lambda u: 0.5 * u)),
    argnums=(0, 1),
  )(x, s)
  np.testing.assert_allclose(dx, [0.5, 0.5, 0.0], rtol=1e-6)
  np.testing.assert_allclose(ds, S4.qmax, rtol=1e-6)


def test_custom_rounding_keeps_the_input_dtype_and_works_per_group():
  spec = QuantSpec(bits=4, granularity="group", axis=0, group_size=2)
  x = jnp.linspace(-1, 1, 12, dtype=jnp.bfloat16).reshape(4, 3)
  s = jnp.full((2, 3), 0.125)
  seen = []
  out = fake_quant(x, s, spec=spec, rounding=lambda u: (seen.append(u), jnp.floor(u))[1])
  assert out.dtype == jnp.bfloat16 and out.shape == (4, 3)
  assert seen[0].shape == (4, 3) and seen[0].dtype == jnp.float32  # the weight's shape, f32
  want = 0.125 * np.clip(np.floor(np.asarray(x, np.float32) / 0.125), spec.qmin, spec.qmax)
  np.testing.assert_array_equal(np.asarray(out, np.float32), want.astype(jnp.bfloat16))


def test_a_rounding_that_changes_the_shape_raises():
  with pytest.raises(ValueError, match="rounding must keep the shape"):
    fake_quant(jnp.ones((2, 3)), jnp.float32(0.5), spec=S4, rounding=lambda u: u[0])


def test_custom_path_passes_the_gradient_at_the_grid_ends():
  # Rounded values land exactly on qmin / qmax (the largest weight under a min-max scale): the
  # gradient there is 1, as in the STE table (jnp.clip's would be 1/2).
  x = jnp.array([-4.0, 3.5, 3.6, 3.9])  # s = 0.5: u = [-8, 7, 7.2, 7.8] -> v = [-8, 7, 7, 8]
  dx = jax.grad(lambda x: jnp.sum(fake_quant(x, jnp.float32(0.5), spec=S4, rounding=round_ste)))(x)
  np.testing.assert_array_equal(dx, [1.0, 1.0, 1.0, 0.0])
