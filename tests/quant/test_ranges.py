"""Range estimators (minmax, percentile, mse, EMA) and scale / zero-point from a range."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from efqat_jax.quant import QuantSpec, fake_quant, ranges

PER_TENSOR = QuantSpec(bits=8)
PER_COLUMN = QuantSpec(bits=8, granularity="channel", axis=-1)
PER_ROW = QuantSpec(bits=8, granularity="channel", axis=0)


def _data(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _sq_error(x, lo, hi, spec):
  scale, zero_point = ranges.scale_and_zero_point(lo, hi, spec)
  return float(jnp.sum((fake_quant(jnp.asarray(x), scale, zero_point, spec=spec) - x) ** 2))


# --- minmax -----------------------------------------------------------------------------------


def test_minmax_per_tensor():
  x = np.array([[1.0, -3.0, 2.0], [0.5, 4.0, -1.0]], np.float32)
  lo, hi = ranges.minmax(x, PER_TENSOR)
  assert lo.shape == hi.shape == ()
  assert (float(lo), float(hi)) == (-3.0, 4.0)


def test_minmax_per_channel_values():
  x = np.array([[1.0, -3.0, 2.0], [0.5, 4.0, -1.0]], np.float32)
  lo, hi = ranges.minmax(x, PER_COLUMN)
  np.testing.assert_array_equal(lo, [0.5, -3.0, -1.0])
  np.testing.assert_array_equal(hi, [1.0, 4.0, 2.0])
  lo, hi = ranges.minmax(x, PER_ROW)
  np.testing.assert_array_equal(lo, [-3.0, -1.0])
  np.testing.assert_array_equal(hi, [2.0, 4.0])


def test_minmax_per_channel_over_a_tuple_of_axes():
  x = _data((2, 3, 4))
  lo, hi = ranges.minmax(x, QuantSpec(granularity="channel", axis=(0, 2)))
  assert lo.shape == (2, 4)
  np.testing.assert_array_equal(lo, x.min(axis=1))
  np.testing.assert_array_equal(hi, x.max(axis=1))


def test_minmax_per_group_values():
  x = _data((8, 3))
  spec = QuantSpec(granularity="group", axis=0, group_size=4)
  lo, hi = ranges.minmax(x, spec)
  assert lo.shape == (2, 3)
  np.testing.assert_array_equal(lo, x.reshape(2, 4, 3).min(axis=1))
  np.testing.assert_array_equal(hi, x.reshape(2, 4, 3).max(axis=1))


def test_minmax_of_bfloat16_is_float32():
  lo, hi = ranges.minmax(jnp.array([-1.5, 2.0], jnp.bfloat16), PER_TENSOR)
  assert lo.dtype == hi.dtype == jnp.float32
  assert (float(lo), float(hi)) == (-1.5, 2.0)


# --- percentile -------------------------------------------------------------------------------


def test_percentile_100_equals_minmax():
  x = _data((5, 3))
  for spec in (PER_TENSOR, PER_COLUMN):
    chex.assert_trees_all_equal(ranges.percentile(x, spec, q=100.0), ranges.minmax(x, spec))


def test_percentile_per_channel_matches_numpy():
  x = _data((50, 3))
  lo, hi = ranges.percentile(x, PER_COLUMN, q=90.0)
  np.testing.assert_allclose(lo, np.percentile(x, 10.0, axis=0), rtol=1e-5)
  np.testing.assert_allclose(hi, np.percentile(x, 90.0, axis=0), rtol=1e-5)


def test_percentile_ignores_an_outlier():
  x = np.linspace(-1.0, 1.0, 1001).astype(np.float32)
  x[500] = 100.0
  lo, hi = ranges.percentile(x, PER_TENSOR, q=99.0)
  assert -1.0 < float(lo) < -0.9 and 0.9 < float(hi) < 1.0
  np.testing.assert_allclose([lo, hi], np.percentile(x, [1.0, 99.0]), rtol=1e-5)
  assert float(ranges.minmax(x, PER_TENSOR)[1]) == 100.0


def test_percentile_default_q_is_99_99():
  x = _data((4000,))
  lo, hi = ranges.percentile(x, PER_TENSOR)
  np.testing.assert_allclose([lo, hi], np.percentile(x, [0.01, 99.99]), atol=1e-3)
  assert float(hi) < x.max() and float(lo) > x.min()


@pytest.mark.parametrize("q", [50.0, 0.0, 10.0, -1.0, 100.5, 200.0])
def test_percentile_q_outside_50_to_100_raises_naming_q(q):
  with pytest.raises(ValueError, match="q"):
    ranges.percentile(jnp.ones(4), PER_TENSOR, q=q)


# --- scale_and_zero_point ---------------------------------------------------------------------


@pytest.mark.parametrize(
  ("spec", "lo", "hi", "scale", "zero_point"),
  [
    (QuantSpec(bits=8), -2.0, 1.0, 2.0 / 127, None),
    (QuantSpec(bits=8), -1.0, 3.0, 3.0 / 127, None),
    (QuantSpec(bits=4, narrow=True), -2.0, 1.0, 2.0 / 7, None),
    (QuantSpec(bits=4, signed=False), -2.0, 3.0, 3.0 / 15, None),
    (QuantSpec(bits=8), 1.0, 3.0, 3.0 / 127, None),
    (QuantSpec.for_activations(8), -1.0, 3.0, 4.0 / 255, 64.0),
    (QuantSpec.for_activations(8), 1.0, 3.0, 3.0 / 255, 0.0),
    (QuantSpec.for_activations(8), -3.0, -1.0, 3.0 / 255, 255.0),
    (QuantSpec.for_activations(4), -1.0, 2.0, 3.0 / 15, 5.0),
    (QuantSpec(bits=8, symmetric=False), -1.0, 3.0, 4.0 / 255, -64.0),
  ],
)
def test_scale_and_zero_point_formulas(spec, lo, hi, scale, zero_point):
  s, z = ranges.scale_and_zero_point(jnp.float32(lo), jnp.float32(hi), spec)
  np.testing.assert_allclose(s, scale, rtol=1e-6)
  if zero_point is None:
    assert z is None
  else:
    assert float(z) == zero_point


@pytest.mark.parametrize(
  "spec",
  [
    QuantSpec(bits=8),
    QuantSpec(bits=4, signed=False),
    QuantSpec.for_activations(8),
    QuantSpec(bits=4, symmetric=False),
  ],
)
def test_degenerate_all_zero_range_gives_scale_one(spec):
  s, z = ranges.scale_and_zero_point(jnp.float32(0.0), jnp.float32(0.0), spec)
  assert float(s) == 1.0
  if not spec.symmetric:
    assert float(z) == spec.qmin
    assert float(fake_quant(jnp.zeros(2), s, z, spec=spec)[0]) == 0.0


def test_per_channel_scales_with_one_degenerate_channel():
  spec = QuantSpec.for_activations(8, granularity="channel", axis=-1)
  x = np.array([[0.0, -1.0, 2.0], [0.0, 3.0, 4.0]], np.float32)
  s, z = ranges.scale_and_zero_point(*ranges.minmax(x, spec), spec)
  np.testing.assert_allclose(s, [1.0, 4.0 / 255, 4.0 / 255], rtol=1e-6)
  np.testing.assert_array_equal(z, [0.0, 64.0, 0.0])


_RANGE_SPECS = [
  QuantSpec(bits=8),
  QuantSpec(bits=4),
  QuantSpec(bits=4, narrow=True),
  QuantSpec.for_activations(8),
  QuantSpec.for_activations(3),
  QuantSpec(bits=4, symmetric=False),
]


@settings(max_examples=40, deadline=None)
@given(
  spec=st.sampled_from(_RANGE_SPECS),
  a=st.floats(-10, 10, width=32),
  b=st.floats(-10, 10, width=32),
)
def test_property_grid_covers_the_range_and_includes_zero(spec, a, b):
  lo, hi = min(a, b), max(a, b)
  s, z = ranges.scale_and_zero_point(jnp.float32(lo), jnp.float32(hi), spec)
  s = float(s)
  assert np.isfinite(s) and s > 0
  if spec.symmetric:
    assert z is None
  else:
    assert float(z) == round(float(z)) and spec.qmin <= float(z) <= spec.qmax
  # The range widened to contain 0 is inside the grid up to half a step (rounding of z).
  lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
  probe = jnp.array([lo0, 0.0, hi0], jnp.float32)
  out = np.asarray(fake_quant(probe, jnp.float32(s), z, spec=spec), np.float64)
  assert out[1] == 0.0
  tol = s / 2 * (1 + 1e-5) + 1e-6
  assert abs(out[0] - lo0) <= tol and abs(out[2] - hi0) <= tol
  # Symmetric: the larger extent is the outermost level; asymmetric: the range spans the grid.
  extent, levels = (
    (max(-lo0, hi0), spec.qmax) if spec.symmetric else (hi0 - lo0, spec.qmax - spec.qmin)
  )
  if extent / levels > 1e-11:
    np.testing.assert_allclose(s * levels, extent, rtol=1e-6)
  elif extent / levels < 1e-13:
    assert s == 1.0  # (near-)degenerate range


# --- mse --------------------------------------------------------------------------------------


def _with_outlier(seed=0, n=2000, outlier=40.0):
  x = _data((n,), seed)
  x[7] = outlier
  return x


@pytest.mark.parametrize(
  "spec", [QuantSpec(bits=4), QuantSpec.for_activations(4), QuantSpec(bits=8)]
)
def test_mse_error_is_not_larger_than_minmax_error(spec):
  x = _with_outlier(outlier=6.0)
  err_mse = _sq_error(x, *ranges.mse(x, spec), spec)
  err_mm = _sq_error(x, *ranges.minmax(x, spec), spec)
  assert err_mse <= err_mm * (1 + 1e-6)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec.for_activations(4)])
def test_mse_error_is_much_smaller_than_minmax_error_with_a_heavy_outlier(spec):
  x = _with_outlier(outlier=40.0)
  lo, hi = ranges.mse(x, spec)
  lo_mm, hi_mm = ranges.minmax(x, spec)
  assert float(hi) < 0.75 * float(hi_mm)
  assert _sq_error(x, lo, hi, spec) < 0.8 * _sq_error(x, lo_mm, hi_mm, spec)


@pytest.mark.parametrize("spec", [QuantSpec.for_activations(4), QuantSpec(bits=3)])
def test_mse_range_is_the_minmax_range_shrunk_by_the_candidate_ratio_with_least_error(spec):
  x = _with_outlier(outlier=6.0)
  lo, hi = ranges.mse(x, spec, num_candidates=20, min_ratio=0.1)
  lo_mm, hi_mm = ranges.minmax(x, spec)
  ratio = float(hi) / float(hi_mm)
  assert 0.1 - 1e-6 <= ratio <= 1.0
  np.testing.assert_allclose(float(lo) / float(lo_mm), ratio, rtol=1e-6)
  # With 20 candidates the ratio is one of linspace(1, 0.1, 20) ...
  candidates = np.linspace(1.0, 0.1, 20)
  assert np.isclose(candidates, ratio, rtol=1e-5).any()
  # ... and, by brute force over all of them, one with the smallest squared error.
  errors = [_sq_error(x, lo_mm * r, hi_mm * r, spec) for r in candidates]
  assert np.argmin(errors) not in (0, len(candidates) - 1)  # an interior optimum
  np.testing.assert_allclose(_sq_error(x, lo, hi, spec), min(errors), rtol=1e-6)


def test_mse_with_one_candidate_or_min_ratio_one_is_minmax():
  x = _with_outlier()
  mm = ranges.minmax(x, PER_TENSOR)
  chex.assert_trees_all_close(ranges.mse(x, PER_TENSOR, num_candidates=1), mm)
  chex.assert_trees_all_close(ranges.mse(x, PER_TENSOR, num_candidates=5, min_ratio=1.0), mm)


def test_mse_per_channel_chooses_each_channel_separately():
  spec = QuantSpec(bits=4, granularity="channel", axis=-1)
  x = np.stack([_with_outlier(seed=1), _data((2000,), seed=2)], axis=-1)
  lo, hi = ranges.mse(x, spec)
  assert lo.shape == hi.shape == (2,)
  for c in range(2):
    lo_c, hi_c = ranges.mse(x[:, c], QuantSpec(bits=4))
    np.testing.assert_allclose([lo[c], hi[c]], [lo_c, hi_c], rtol=1e-5)
  # Only the channel with the outlier is shrunk hard.
  _, hi_mm = ranges.minmax(x, spec)
  assert float(hi[0]) < 0.5 * float(hi_mm[0])
  assert float(hi[1]) > 0.5 * float(hi_mm[1])


@pytest.mark.parametrize(
  ("num_candidates", "min_ratio"), [(0, 0.2), (-1, 0.2), (10, 0.0), (10, -0.5), (10, 1.5)]
)
def test_mse_rejects_bad_settings(num_candidates, min_ratio):
  with pytest.raises(ValueError, match="num_candidates"):
    ranges.mse(jnp.ones(4), PER_TENSOR, num_candidates=num_candidates, min_ratio=min_ratio)


# --- EMA --------------------------------------------------------------------------------------


def test_ema_init_is_empty():
  state = ranges.ema_init((3,))
  assert state.lo.shape == state.hi.shape == (3,)
  assert int(state.count) == 0 and state.count.dtype == jnp.int32
  assert ranges.ema_init().lo.shape == ()


def test_ema_first_batch_sets_the_range_whatever_the_stored_values():
  stale = ranges.EmaRange(jnp.float32(-50.0), jnp.float32(50.0), jnp.zeros((), jnp.int32))
  state = ranges.ema_update(stale, jnp.array([-1.0, 0.5, 2.0]), PER_TENSOR, momentum=0.9)
  assert (float(state.lo), float(state.hi), int(state.count)) == (-1.0, 2.0, 1)


def test_ema_later_batches_move_by_the_momentum():
  state = ranges.ema_init()
  state = ranges.ema_update(state, jnp.array([-1.0, 2.0]), PER_TENSOR, momentum=0.75)
  state = ranges.ema_update(state, jnp.array([-5.0, 6.0]), PER_TENSOR, momentum=0.75)
  np.testing.assert_allclose([state.lo, state.hi], [-2.0, 3.0], rtol=1e-6)
  state = ranges.ema_update(state, jnp.array([2.0, 7.0]), PER_TENSOR, momentum=0.75)
  np.testing.assert_allclose([state.lo, state.hi], [-1.0, 4.0], rtol=1e-6)
  assert int(state.count) == 3


def test_ema_momentum_zero_follows_the_last_batch():
  state = ranges.ema_update(ranges.ema_init(), jnp.array([-1.0, 2.0]), PER_TENSOR, momentum=0.0)
  state = ranges.ema_update(state, jnp.array([3.0, 4.0]), PER_TENSOR, momentum=0.0)
  assert (float(state.lo), float(state.hi)) == (3.0, 4.0)


def test_ema_per_channel():
  state = ranges.ema_init((2,))
  state = ranges.ema_update(state, jnp.array([[0.0, -2.0], [1.0, 2.0]]), PER_COLUMN, 0.5)
  state = ranges.ema_update(state, jnp.array([[2.0, -4.0], [3.0, 0.0]]), PER_COLUMN, 0.5)
  np.testing.assert_allclose(state.lo, [1.0, -3.0])
  np.testing.assert_allclose(state.hi, [2.0, 1.0])


def test_ema_update_under_jit_matches_eager():
  update = jax.jit(ranges.ema_update, static_argnames=("spec", "momentum"))
  batches = [jnp.array([-1.0, 2.0]), jnp.array([-3.0, 1.0])]
  eager, jitted = ranges.ema_init(), ranges.ema_init()
  for b in batches:
    eager = ranges.ema_update(eager, b, PER_TENSOR, 0.9)
    jitted = update(jitted, b, spec=PER_TENSOR, momentum=0.9)
  chex.assert_trees_all_close(jitted, eager)
  np.testing.assert_allclose([eager.lo, eager.hi], [-1.2, 1.9], rtol=1e-6)


@pytest.mark.parametrize("momentum", [1.0, -0.1, 1.5])
def test_ema_momentum_outside_0_to_1_raises(momentum):
  with pytest.raises(ValueError, match="momentum"):
    ranges.ema_update(ranges.ema_init(), jnp.ones(3), PER_TENSOR, momentum=momentum)
