"""fake_quant: forward values, STE/LSQ gradients against their definitions, properties, errors."""

import functools
import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from efqat_jax.quant import QuantSpec, check_scale_values, fake_quant, lsq_grad_scale

S4 = QuantSpec(bits=4)  # grid [-8, 7]
A4 = QuantSpec.for_activations(4)  # grid [0, 15], asymmetric


def _reference(x, s, z, g, spec, grad_scale):
  """Per-tensor forward and backward written out from the definition table, in float64."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  s = float(s)
  z = 0.0 if z is None else float(np.round(z))
  u = x / s
  r = np.round(u)
  below, above = r + z < spec.qmin, r + z > spec.qmax
  inside = ~(below | above)
  out = s * (np.clip(r + z, spec.qmin, spec.qmax) - z)
  dx = np.where(inside, g, 0.0)
  local_ds = np.where(inside, r - u, np.where(below, spec.qmin - z, spec.qmax - z))
  ds = grad_scale * np.sum(g * local_ds)
  dz = grad_scale * np.sum(np.where(inside, 0.0, -g * s))
  return out, dx, ds, dz


def _grad_fn(spec, g, grad_scale=None):
  """Gradients of ``sum(g * fake_quant(x, s, z))`` wrt x, s and (if asymmetric) z."""
  if spec.symmetric:

    def loss(x, s):
      return jnp.sum(g * fake_quant(x, s, spec=spec, grad_scale=grad_scale))

    return jax.grad(loss, argnums=(0, 1))

  def loss(x, s, z):
    return jnp.sum(g * fake_quant(x, s, z, spec=spec, grad_scale=grad_scale))

  return jax.grad(loss, argnums=(0, 1, 2))


@functools.partial(jax.jit, static_argnames=("spec", "grad_scale"))
def _jit_grads(x, s, z, g, *, spec, grad_scale=None):
  """``_grad_fn(spec, g, grad_scale)(x, s[, z])``, jitted (for reference values in loops)."""
  grad_fn = _grad_fn(spec, g, grad_scale)
  return grad_fn(x, s) if z is None else grad_fn(x, s, z)


# --- forward ----------------------------------------------------------------------------------


def test_docstring_example():
  out = fake_quant(jnp.array([0.26, -3.0]), jnp.array(0.25), spec=S4)
  np.testing.assert_array_equal(out, np.array([0.25, -2.0], np.float32))


def test_forward_symmetric_concrete_values():
  # s = 0.5, grid [-8, 7] -> representable values [-4.0, 3.5].
  x = jnp.array([-9.0, -4.1, -1.2, 0.0, 0.3, 1.26, 3.5, 3.74, 100.0])
  out = fake_quant(x, jnp.float32(0.5), spec=S4)
  np.testing.assert_array_equal(out, [-4.0, -4.0, -1.0, 0.0, 0.5, 1.5, 3.5, 3.5, 3.5])


def test_forward_narrow_drops_the_most_negative_level():
  x = jnp.array([-10.0, 10.0])
  np.testing.assert_array_equal(fake_quant(x, 1.0, spec=QuantSpec(bits=4, narrow=True)), [-7, 7])
  np.testing.assert_array_equal(fake_quant(x, 1.0, spec=S4), [-8, 7])


def test_forward_asymmetric_concrete_values():
  # s = 0.5, z = 3, grid [0, 15] -> representable values [-1.5, 6.0].
  x = jnp.array([-2.0, -1.5, -0.2, 0.0, 1.26, 6.0, 7.0])
  out = fake_quant(x, jnp.float32(0.5), jnp.float32(3.0), spec=A4)
  np.testing.assert_array_equal(out, [-1.5, -1.5, 0.0, 0.0, 1.5, 6.0, 6.0])


def test_zero_point_is_rounded_in_the_forward_pass():
  x = jnp.linspace(-3.0, 8.0, 23)
  s = jnp.float32(0.5)
  np.testing.assert_array_equal(
    fake_quant(x, s, jnp.float32(2.7), spec=A4), fake_quant(x, s, jnp.float32(3.0), spec=A4)
  )


def test_per_channel_forward_uses_each_channels_scale():
  spec = QuantSpec(bits=4, granularity="channel", axis=0)
  x = jnp.array([[0.3, 0.7, 9.0], [0.3, 0.7, 9.0]])
  out = fake_quant(x, jnp.array([1.0, 0.25]), spec=spec)
  np.testing.assert_array_equal(out, [[0.0, 1.0, 7.0], [0.25, 0.75, 1.75]])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_output_keeps_shape_and_dtype_and_is_computed_in_float32(dtype):
  x = jnp.linspace(-0.9, 0.8, 36, dtype=dtype).reshape(3, 4, 3)
  out = fake_quant(x, jnp.float32(0.1), spec=S4)
  assert out.shape == x.shape and out.dtype == dtype
  # The grid is computed in float32 (x / s rounded, clipped to [-8, 7], times s) and only the
  # result is cast back; rounding x / s in the input's dtype would move some levels.
  s = np.float32(0.1)
  want = (s * np.clip(np.round(np.asarray(x, np.float32) / s), -8, 7)).astype(dtype)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))


def test_lsq_grad_scale_values():
  assert lsq_grad_scale(S4, 10) == pytest.approx(1 / math.sqrt(70))
  assert lsq_grad_scale(QuantSpec.for_activations(8), 4) == pytest.approx(1 / math.sqrt(1020))
  assert lsq_grad_scale(QuantSpec(bits=4, narrow=True), 1) == pytest.approx(1 / math.sqrt(7))
  assert lsq_grad_scale(S4, 0) == pytest.approx(1 / math.sqrt(7))


# --- gradients --------------------------------------------------------------------------------


class FakeQuantGradTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_ste_mask_symmetric(self):
    # s = 0.5: inside iff round(x / s) in [-8, 7], i.e. x / s in [-8.5, 7.5).
    x = jnp.array([-5.0, -4.3, -4.0, -1.1, 0.0, 2.2, 3.5, 3.7, 3.8, 10.0])
    mask = np.array([0, 0, 1, 1, 1, 1, 1, 1, 0, 0], np.float32)
    g = jnp.arange(1.0, 11.0)
    dx, _ = self.variant(_grad_fn(S4, g))(x, jnp.float32(0.5))
    np.testing.assert_array_equal(dx, mask * np.asarray(g))

  @chex.variants(with_jit=True, without_jit=True)
  def test_ste_mask_asymmetric(self):
    # s = 0.5, z = 3: inside iff round(x / s) + 3 in [0, 15], i.e. x / s in [-3.5, 12.5].
    x = jnp.array([-3.0, -1.8, -1.6, -1.5, 0.0, 3.0, 6.0, 6.2, 6.3, 9.0])
    mask = np.array([0, 0, 1, 1, 1, 1, 1, 1, 0, 0], np.float32)
    g = jnp.arange(1.0, 11.0)
    dx, _, _ = self.variant(_grad_fn(A4, g))(x, jnp.float32(0.5), jnp.float32(3.0))
    np.testing.assert_array_equal(dx, mask * np.asarray(g))

  @chex.variants(with_jit=True, without_jit=True)
  def test_scale_grad_docstring_example_by_hand(self):
    # u = [1.04, -12]: inside gives round(u) - u = -0.04, below gives qmin = -8.
    x = jnp.array([0.26, -3.0])
    _, ds = self.variant(_grad_fn(S4, jnp.ones(2)))(x, jnp.float32(0.25))
    np.testing.assert_allclose(ds, (-0.04 - 8.0) / math.sqrt(2 * 7), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_scalar_input_and_size_one_scale_shapes(self):
    # A 0-d input (u = 1.04, inside) and a (1, 1) per-tensor scale keep their shapes.
    dx, ds = self.variant(_grad_fn(S4, jnp.float32(1.0)))(jnp.float32(0.26), jnp.float32(0.25))
    assert dx.shape == ds.shape == ()
    np.testing.assert_allclose((dx, ds), (1.0, (1.0 - 1.04) / math.sqrt(7)), rtol=1e-5)
    x = jnp.full((2, 3), 3.3)  # u = 3.3: every entry contributes round(u) - u = -0.3
    _, ds = self.variant(_grad_fn(S4, jnp.ones((2, 3))))(x, jnp.ones((1, 1)))
    assert ds.shape == (1, 1)
    np.testing.assert_allclose(ds, [[6 * -0.3 / math.sqrt(6 * 7)]], rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_point_grad_by_hand(self):
    # s = 0.5, z = 3: x = -3 (below, g=2), 1 (inside, g=5), 9 (above, g=-1).
    x, g = jnp.array([-3.0, 1.0, 9.0]), jnp.array([2.0, 5.0, -1.0])
    _, ds, dz = self.variant(_grad_fn(A4, g, grad_scale=1.0))(x, jnp.float32(0.5), jnp.float32(3.0))
    np.testing.assert_allclose(dz, -0.5 * (2.0 - 1.0), rtol=1e-6)
    np.testing.assert_allclose(ds, 2.0 * (0 - 3) + 5.0 * 0.0 - 1.0 * (15 - 3), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("symmetric_default", QuantSpec(bits=4), 0.5, None, None),
    ("symmetric_explicit", QuantSpec(bits=4), 0.5, None, 1.0),
    ("narrow_explicit", QuantSpec(bits=3, narrow=True), 0.7, None, 0.3),
    ("unsigned_symmetric", QuantSpec(bits=4, signed=False), 0.4, None, None),
    ("asymmetric_default", QuantSpec.for_activations(4), 0.3, 5.0, None),
    ("asymmetric_explicit", QuantSpec.for_activations(4), 0.3, 5.0, 2.0),
    ("signed_asymmetric", QuantSpec(bits=3, symmetric=False), 0.9, -1.0, None),
  )
  def test_grads_match_definition(self, spec, s, z, grad_scale):
    rng = np.random.default_rng(0)
    x = rng.uniform(-8.0, 8.0, size=24).astype(np.float32)
    g = rng.normal(size=24).astype(np.float32)
    expected_gs = 1 / math.sqrt(24 * spec.qmax) if grad_scale is None else grad_scale
    out_ref, dx_ref, ds_ref, dz_ref = _reference(x, s, z, g, spec, expected_gs)
    # Every region of the table is exercised.
    v = np.round(x / s) + (z or 0.0)
    assert (v < spec.qmin).any() and (v > spec.qmax).any()
    assert ((v >= spec.qmin) & (v <= spec.qmax)).sum() >= 5

    args = (jnp.asarray(x), jnp.float32(s)) + (() if z is None else (jnp.float32(z),))
    grads = self.variant(_grad_fn(spec, jnp.asarray(g), grad_scale))(*args)
    chex.assert_trees_all_close(grads[0], dx_ref.astype(np.float32), atol=0, rtol=0)
    chex.assert_trees_all_close(grads[1], np.float32(ds_ref), rtol=1e-5, atol=1e-6)
    assert grads[1].shape == () and grads[1].dtype == jnp.float32
    if z is not None:
      chex.assert_trees_all_close(grads[2], np.float32(dz_ref), rtol=1e-5, atol=1e-6)
    out = fake_quant(*args, spec=spec)
    chex.assert_trees_all_close(out, out_ref.astype(np.float32), rtol=1e-6, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_default_grad_scale_is_one_over_sqrt_n_qmax(self):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(-6, 6, size=24).astype(np.float32))
    g = jnp.asarray(rng.normal(size=24).astype(np.float32))
    s, z = jnp.float32(0.3), jnp.float32(4.0)
    _, ds1, dz1 = self.variant(_grad_fn(A4, g, grad_scale=1.0))(x, s, z)
    _, ds, dz = self.variant(_grad_fn(A4, g))(x, s, z)
    gs = 1 / math.sqrt(24 * 15)
    chex.assert_trees_all_close((ds, dz), (ds1 * gs, dz1 * gs), rtol=1e-6)
    assert abs(float(ds1)) > 1e-3 and abs(float(dz1)) > 1e-3

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_channel_grads_reduce_per_channel(self):
    spec = QuantSpec(bits=4, signed=False, symmetric=False, granularity="channel", axis=-1)
    rng = np.random.default_rng(2)
    x = rng.uniform(-4, 12, size=(6, 3)).astype(np.float32)
    g = rng.normal(size=(6, 3)).astype(np.float32)
    s, z = np.array([0.2, 0.5, 1.0], np.float32), np.array([0.0, 4.0, 12.0], np.float32)
    dx, ds, dz = self.variant(_grad_fn(spec, jnp.asarray(g)))(x, s, z)
    assert ds.shape == dz.shape == (3,)
    # Default grad scale per channel: n = 6 entries share each scale.
    gs = 1 / math.sqrt(6 * 15)
    for c in range(3):
      _, dx_c, ds_c, dz_c = _reference(x[:, c], s[c], z[c], g[:, c], spec, gs)
      np.testing.assert_array_equal(dx[:, c], dx_c)
      np.testing.assert_allclose(ds[c], ds_c, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(dz[c], dz_c, rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_channel_grads_equal_per_tensor_grads_of_each_channel(self):
    spec = QuantSpec(bits=3, granularity="channel", axis=0)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.uniform(-5, 5, size=(3, 8)).astype(np.float32))
    g = jnp.asarray(rng.normal(size=(3, 8)).astype(np.float32))
    s = jnp.array([0.3, 0.6, 1.1])
    dx, ds = self.variant(_grad_fn(spec, g))(x, s)
    per_tensor = QuantSpec(bits=3)
    for c in range(3):
      dx_c, ds_c = _jit_grads(x[c], s[c], None, g[c], spec=per_tensor)
      chex.assert_trees_all_close((dx[c], ds[c]), (dx_c, ds_c), rtol=1e-6, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_group_grads_equal_per_tensor_grads_of_each_group(self):
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", axis=0, group_size=4)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.uniform(-5, 5, size=(8, 2)).astype(np.float32))
    g = jnp.asarray(rng.normal(size=(8, 2)).astype(np.float32))
    s = jnp.array([[0.3, 0.5], [0.2, 0.9]])
    z = jnp.array([[0.0, 2.0], [-3.0, 5.0]])
    dx, ds, dz = self.variant(_grad_fn(spec, g))(x, s, z)
    assert ds.shape == dz.shape == (2, 2)
    per_tensor = QuantSpec(bits=4, symmetric=False)
    for i in range(2):
      for j in range(2):
        rows = slice(4 * i, 4 * i + 4)
        got = (dx[rows, j], ds[i, j], dz[i, j])
        want = _jit_grads(x[rows, j], s[i, j], z[i, j], g[rows, j], spec=per_tensor)
        chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_not_learnable_gives_exactly_zero_scale_and_zero_point_grads(self):
    spec = QuantSpec(bits=4, signed=False, symmetric=False, learnable=False)
    x = jnp.array([-3.0, -1.0, 0.4, 2.0, 9.0])
    g = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
    dx, ds, dz = self.variant(_grad_fn(spec, g, grad_scale=1.0))(x, jnp.float32(0.5), 3.0)
    assert float(ds) == 0.0 and float(dz) == 0.0
    # The input still gets the straight-through gradient (inside iff x / 0.5 in [-3.5, 12.5]).
    np.testing.assert_array_equal(dx, [0.0, 2.0, 3.0, 4.0, 0.0])
    learnable = QuantSpec(bits=4, signed=False, symmetric=False)
    _, ds_l, dz_l = _jit_grads(x, jnp.float32(0.5), 3.0, g, spec=learnable, grad_scale=1.0)
    assert float(ds_l) != 0.0 and float(dz_l) != 0.0

  @chex.variants(with_jit=True, without_jit=True)
  def test_not_learnable_per_channel_symmetric_scale_grad_is_zero(self):
    spec = QuantSpec.for_weights(4, learnable=False)
    x = jnp.linspace(-3, 3, 12).reshape(4, 3)
    _, ds = self.variant(_grad_fn(spec, jnp.ones((4, 3))))(x, jnp.array([0.1, 0.2, 0.3]))
    np.testing.assert_array_equal(ds, np.zeros(3, np.float32))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("symmetric_above", QuantSpec(bits=4), [5.0, 6.0, 7.5], None),
    ("symmetric_below", QuantSpec(bits=4), [-5.0, -6.5, -9.0], None),
    ("symmetric_both", QuantSpec(bits=3, narrow=True), [-4.0, 3.0, 8.0], None),
    ("asymmetric_both", QuantSpec.for_activations(4), [-4.0, -3.0, 9.0, 12.0], 4.0),
  )
  def test_clipped_scale_grad_equals_central_finite_difference(self, spec, x, z):
    # In the clipped region x_hat = s * (qmin/qmax - z) is linear in s, so the LSQ gradient is
    # the true derivative there (with grad_scale=1).
    x = jnp.asarray(x)
    g = jnp.linspace(0.5, 2.0, x.size)
    s0, h = 0.5, 1e-3
    zz = () if z is None else (jnp.float32(z),)
    v_lo = np.round(np.asarray(x) / (s0 + h)) + (z or 0)
    v_hi = np.round(np.asarray(x) / (s0 - h)) + (z or 0)
    assert np.all((v_lo < spec.qmin) | (v_lo > spec.qmax)), "test data must stay clipped"
    assert np.all((v_hi < spec.qmin) | (v_hi > spec.qmax)), "test data must stay clipped"

    def f(s):
      return float(jnp.sum(g * fake_quant(x, jnp.float32(s), *zz, spec=spec, grad_scale=1.0)))

    fd = (f(s0 + h) - f(s0 - h)) / (2 * h)
    grads = self.variant(_grad_fn(spec, g, grad_scale=1.0))(x, jnp.float32(s0), *zz)
    np.testing.assert_allclose(grads[1], fd, rtol=2e-3)
    # x_hat is constant in x there: the STE gradient is the true one, 0.
    np.testing.assert_array_equal(grads[0], np.zeros(x.size, np.float32))

  @chex.variants(with_jit=True, without_jit=True)
  def test_clipped_zero_point_grad_equals_unit_step_difference(self):
    # Outside the grid x_hat = s * (q_clip - round(z)) moves by -s per unit of z.
    x = jnp.array([-6.0, -5.0, 10.0, 11.0, 12.0])
    g = jnp.array([1.0, 2.0, 0.5, -1.0, 3.0])
    s, z0 = jnp.float32(0.5), 5.0

    def f(z):
      return float(jnp.sum(g * fake_quant(x, s, jnp.float32(z), spec=A4, grad_scale=1.0)))

    step = (f(z0 + 1) - f(z0 - 1)) / 2
    _, _, dz = self.variant(_grad_fn(A4, g, grad_scale=1.0))(x, s, jnp.float32(z0))
    np.testing.assert_allclose(dz, step, rtol=1e-6)
    np.testing.assert_allclose(dz, -0.5 * float(jnp.sum(g)), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ste_is_not_the_true_derivative_inside_the_grid(self):
    # Away from rounding boundaries x_hat is locally constant (finite differences give 0); the
    # straight-through estimator deliberately reports 1 instead.
    x = jnp.array([0.1, 1.05, -2.2])
    s = jnp.float32(0.5)
    h = 1e-3
    fd = (fake_quant(x + h, s, spec=S4) - fake_quant(x - h, s, spec=S4)) / (2 * h)
    np.testing.assert_array_equal(fd, np.zeros(3, np.float32))
    dx, _ = self.variant(_grad_fn(S4, jnp.ones(3)))(x, s)
    np.testing.assert_array_equal(dx, np.ones(3, np.float32))

  @chex.variants(with_jit=True, without_jit=True)
  def test_input_grad_keeps_the_input_dtype(self):
    x = jnp.linspace(-5, 5, 8, dtype=jnp.bfloat16)
    dx, ds = self.variant(_grad_fn(S4, jnp.ones(8, jnp.bfloat16)))(x, jnp.float32(0.5))
    assert dx.dtype == jnp.bfloat16 and ds.dtype == jnp.float32


def test_forward_under_jit_with_traced_scale_matches_eager():
  x = jnp.linspace(-3, 9, 17)
  fn = jax.jit(lambda x, s, z: fake_quant(x, s, z, spec=A4))
  np.testing.assert_array_equal(
    fn(x, jnp.float32(0.4), jnp.float32(2.0)), fake_quant(x, 0.4, 2.0, spec=A4)
  )


# --- vmap -------------------------------------------------------------------------------------


def test_vmap_over_per_tensor_scales_equals_a_loop():
  rng = np.random.default_rng(5)
  xs = jnp.asarray(rng.uniform(-4, 4, size=(3, 5)).astype(np.float32))
  scales = jnp.array([0.1, 0.3, 1.0])
  out = jax.vmap(lambda x, s: fake_quant(x, s, spec=S4))(xs, scales)
  loop = jnp.stack([fake_quant(xs[i], scales[i], spec=S4) for i in range(3)])
  np.testing.assert_array_equal(out, loop)


def test_vmap_asymmetric_with_batched_zero_points_equals_a_loop():
  rng = np.random.default_rng(6)
  xs = jnp.asarray(rng.uniform(-4, 4, size=(3, 5)).astype(np.float32))
  scales, zps = jnp.array([0.2, 0.3, 0.5]), jnp.array([0.0, 7.0, 15.0])
  out = jax.vmap(lambda x, s, z: fake_quant(x, s, z, spec=A4))(xs, scales, zps)
  loop = jnp.stack([fake_quant(xs[i], scales[i], zps[i], spec=A4) for i in range(3)])
  np.testing.assert_array_equal(out, loop)


def test_vmap_of_grads_equals_a_loop():
  rng = np.random.default_rng(7)
  xs = jnp.asarray(rng.uniform(-6, 6, size=(3, 5)).astype(np.float32))
  g = jnp.asarray(rng.normal(size=5).astype(np.float32))
  scales, zps = jnp.array([0.2, 0.3, 0.5]), jnp.array([0.0, 7.0, 15.0])
  batched = jax.vmap(_grad_fn(A4, g))(xs, scales, zps)
  for i in range(3):
    want = _jit_grads(xs[i], scales[i], zps[i], g, spec=A4)
    chex.assert_trees_all_close(jax.tree.map(lambda t, i=i: t[i], batched), want, rtol=1e-6)


# --- properties -------------------------------------------------------------------------------

_SPECS = [
  QuantSpec(bits=2),
  QuantSpec(bits=4),
  QuantSpec(bits=8),
  QuantSpec(bits=4, narrow=True),
  QuantSpec(bits=4, signed=False),
  QuantSpec(bits=3, symmetric=False),
  QuantSpec.for_activations(4),
  QuantSpec.for_activations(8),
]
_SHAPES = [(1,), (7,), (2, 3)]
_VALUES = st.floats(-10, 10, width=32)
_SCALES = st.floats(0.015625, 4.0, width=32)
_PROPERTY = settings(max_examples=30, deadline=None)


@st.composite
def _per_tensor_case(draw):
  spec = draw(st.sampled_from(_SPECS))
  x = draw(hnp.arrays(np.float32, draw(st.sampled_from(_SHAPES)), elements=_VALUES))
  s = np.float32(draw(_SCALES))
  z = None if spec.symmetric else np.float32(draw(st.integers(spec.qmin, spec.qmax)))
  return spec, x, s, z


def _fq(spec, x, s, z):
  return np.asarray(fake_quant(jnp.asarray(x), jnp.asarray(s), z, spec=spec))


# Jitted: one compile per (shape, spec) instead of one per eager op and blocked shape.
_fake_quant_jit = jax.jit(fake_quant, static_argnames=("spec", "grad_scale"))


@_PROPERTY
@given(_per_tensor_case())
def test_property_output_is_on_the_integer_grid(case):
  spec, x, s, z = case
  k = _fq(spec, x, s, z).astype(np.float64) / s + (0.0 if z is None else z)
  np.testing.assert_allclose(k, np.round(k), atol=1e-3)
  assert k.min() >= spec.qmin - 1e-3 and k.max() <= spec.qmax + 1e-3


@_PROPERTY
@given(_per_tensor_case())
def test_property_error_is_at_most_half_a_step_from_the_clipped_input(case):
  spec, x, s, z = case
  zf = 0.0 if z is None else float(z)
  lo, hi = s * (spec.qmin - zf), s * (spec.qmax - zf)
  out = _fq(spec, x, s, z).astype(np.float64)
  assert np.all(np.abs(out - np.clip(x, lo, hi)) <= s / 2 * (1 + 1e-5) + 1e-6)


@_PROPERTY
@given(_per_tensor_case())
def test_property_quantizing_twice_changes_nothing(case):
  spec, x, s, z = case
  once = _fq(spec, x, s, z)
  np.testing.assert_array_equal(_fq(spec, once, s, z), once)


@_PROPERTY
@given(_per_tensor_case())
def test_property_output_is_monotone_in_the_input(case):
  spec, x, s, z = case
  xs = np.sort(x.ravel())
  assert np.all(np.diff(_fq(spec, xs, s, z)) >= 0)


@_PROPERTY
@given(_per_tensor_case())
def test_property_zero_is_exactly_representable(case):
  spec, x, s, z = case
  x = x.copy()
  x.ravel()[::2] = 0.0
  out = _fq(spec, x, s, z)
  assert np.all(out.ravel()[::2] == 0.0)
  assert np.all(_fq(spec, np.zeros(3, np.float32), s, z) == 0.0)


@st.composite
def _per_channel_case(draw):
  spec_kw = draw(
    st.sampled_from(
      [dict(bits=4), dict(bits=3, narrow=True), dict(bits=4, signed=False, symmetric=False)]
    )
  )
  shape = draw(st.sampled_from([(3, 4), (2, 3, 2)]))
  axis = draw(st.integers(-len(shape), len(shape) - 1))
  spec = QuantSpec(granularity="channel", axis=axis, **spec_kw)
  x = draw(hnp.arrays(np.float32, shape, elements=_VALUES))
  n = shape[axis]
  s = np.asarray(draw(st.lists(_SCALES, min_size=n, max_size=n)), np.float32)
  z = None
  if not spec.symmetric:
    z = np.asarray(draw(st.lists(st.integers(spec.qmin, spec.qmax), min_size=n, max_size=n)))
    z = z.astype(np.float32)
  return spec, x, s, z


@_PROPERTY
@given(_per_channel_case())
def test_property_per_channel_equals_per_tensor_on_each_channel(case):
  spec, x, s, z = case
  out = np.asarray(_fake_quant_jit(x, s, z, spec=spec))
  per_tensor = QuantSpec(
    bits=spec.bits, signed=spec.signed, narrow=spec.narrow, symmetric=spec.symmetric
  )
  # Per-tensor fake_quant of every channel slice.
  want = _per_tensor_over_rows(per_tensor, np.moveaxis(x, spec.axis, 0), s, z)
  np.testing.assert_array_equal(np.moveaxis(out, spec.axis, 0), want)


def _per_tensor_over_rows(spec, rows, s, z):
  """``fake_quant(rows[i], s[i], z[i])`` for every i, with a per-tensor spec (a jitted loop)."""
  return np.stack(
    [
      np.asarray(_fake_quant_jit(rows[i], s[i], None if z is None else z[i], spec=spec))
      for i in range(len(rows))
    ]
  )


@st.composite
def _group_case(draw):
  shape, axis, group_size = draw(
    st.sampled_from(
      [((8, 3), 0, 1), ((8, 3), 0, 2), ((8, 3), 0, 4), ((8, 3), 0, 8), ((3, 6), -1, 3)]
    )
  )
  symmetric = draw(st.booleans())
  spec = QuantSpec(
    bits=4, symmetric=symmetric, granularity="group", axis=axis, group_size=group_size
  )
  x = draw(hnp.arrays(np.float32, shape, elements=_VALUES))
  pshape = list(shape)
  pshape[axis] //= group_size
  s = draw(hnp.arrays(np.float32, tuple(pshape), elements=_SCALES))
  z = None
  if not symmetric:
    z = draw(
      hnp.arrays(np.float32, tuple(pshape), elements=st.integers(spec.qmin, spec.qmax).map(float))
    )
  return spec, x, s, z


@_PROPERTY
@given(_group_case())
def test_property_group_equals_per_tensor_on_each_group_slice(case):
  spec, x, s, z = case
  out = np.asarray(_fake_quant_jit(x, s, z, spec=spec))
  per_tensor = QuantSpec(bits=4, symmetric=spec.symmetric)
  gs, axis = spec.group_size, spec.axis % x.ndim
  # Rows = group slices: (n // gs, gs, other) -> (n // gs, other, gs) -> (groups * other, gs).
  xm, om = np.moveaxis(x, axis, 0), np.moveaxis(out, axis, 0)
  n_groups, n_other = xm.shape[0] // gs, xm.shape[1]
  rows = xm.reshape(n_groups, gs, n_other).transpose(0, 2, 1).reshape(-1, gs)
  flat = lambda p: None if p is None else np.moveaxis(p, axis, 0).reshape(-1)
  want = _per_tensor_over_rows(per_tensor, rows, flat(s), flat(z))
  want = want.reshape(n_groups, n_other, gs).transpose(0, 2, 1).reshape(xm.shape)
  np.testing.assert_array_equal(om, want)


# --- invalid inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, -0.5, np.nan, np.inf, -np.inf])
def test_non_positive_or_non_finite_scale_raises(scale):
  with pytest.raises(ValueError, match="scale"):
    fake_quant(jnp.ones(3), jnp.float32(scale), spec=S4)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_one_bad_per_channel_scale_raises(bad):
  spec = QuantSpec.for_weights(4)
  with pytest.raises(ValueError, match="scale"):
    fake_quant(jnp.ones((2, 3)), jnp.array([0.5, bad, 1.0]), spec=spec)


def test_check_scale_values_accepts_positive_finite_and_skips_tracers():
  check_scale_values(jnp.array([1e-8, 3.0]))
  # A traced scale has no value to check; the check must not fail on it.
  jax.jit(lambda s: (check_scale_values(s), s)[1])(jnp.float32(-1.0))


@pytest.mark.parametrize(
  ("spec", "x_shape", "scale_shape"),
  [
    (QuantSpec(bits=4), (3, 4), (3,)),
    (QuantSpec(bits=4), (3, 4), (2, 1)),
    (QuantSpec.for_weights(4), (3, 4), (3,)),
    (QuantSpec.for_weights(4), (3, 4), ()),
    (QuantSpec(granularity="group", axis=0, group_size=2), (4, 3), (4, 3)),
    (QuantSpec(granularity="group", axis=0, group_size=2), (4, 3), (2,)),
  ],
)
def test_wrong_scale_shape_raises(spec, x_shape, scale_shape):
  with pytest.raises(ValueError, match="scale has shape"):
    fake_quant(jnp.ones(x_shape), jnp.ones(scale_shape), spec=spec)


def test_wrong_zero_point_shape_raises():
  spec = QuantSpec(bits=4, symmetric=False, granularity="channel", axis=0)
  with pytest.raises(ValueError, match="zero_point has shape"):
    fake_quant(jnp.ones((3, 4)), jnp.ones(3), jnp.zeros(4), spec=spec)


def test_zero_point_with_symmetric_spec_raises():
  with pytest.raises(ValueError, match="zero_point"):
    fake_quant(jnp.ones(3), jnp.float32(1.0), jnp.float32(0.0), spec=S4)


def test_missing_zero_point_with_asymmetric_spec_raises():
  with pytest.raises(ValueError, match="zero_point"):
    fake_quant(jnp.ones(3), jnp.float32(1.0), spec=A4)


@pytest.mark.parametrize("zero_point", [-1.0, 16.0])
def test_concrete_zero_point_outside_the_grid_raises(zero_point):
  spec = QuantSpec.for_activations(4)
  with pytest.raises(ValueError, match="zero_point must lie in"):
    fake_quant(jnp.ones(3), jnp.float32(0.1), jnp.float32(zero_point), spec=spec)
