"""OPTQ, GPFQ and AXE on single weight matrices: better than rounding where they should be,
exactly rounding where they should be, and never over their accumulator."""

import itertools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from efqat_jax.ptq.axe import accumulator_rounder, budget_bounds, l1_ball_threshold
from efqat_jax.ptq.columns import grid_rounder
from efqat_jax.ptq.gpfq import gpfq, strictly_lower_product
from efqat_jax.ptq.optq import inverse_cholesky_upper, optq
from efqat_jax.quant import QuantSpec
from efqat_jax.quant.accumulator import AccumulatorSpec, fits, input_range, tile_sums

A8 = QuantSpec.for_activations(8)
THRESHOLD = jax.jit(l1_ball_threshold)
QMIN, QMAX = -7, 7


def correlated_layer(k=96, oc=40, rows=512, seed=0):
  """Inputs mixed by a random lower-triangular matrix (strongly correlated), weights, scales."""
  rng = np.random.default_rng(seed)
  mix = np.tril(rng.standard_normal((k, k))) / np.sqrt(k)
  x = rng.standard_normal((rows, k)) @ mix.T
  w = rng.standard_normal((oc, k)) / np.sqrt(k)
  scales = np.max(np.abs(w), axis=1, keepdims=True) / QMAX
  return (jnp.asarray(a, jnp.float32) for a in (x, w, scales))


def rounded(w, scales):
  return scales * jnp.clip(jnp.round(w / scales), QMIN, QMAX)


def output_error(x, w, q):
  return float(jnp.linalg.norm(x @ (w - q).T) / jnp.linalg.norm(x @ w.T))


def run_optq(w, h, scales, act_order=True, rounder=None):
  rounder = rounder or grid_rounder(scales, w.shape[1], QMIN, QMAX)
  return jax.jit(lambda w, h: optq(w, h, rounder, 0.01, act_order, 32))(w, h)


def run_gpfq(w, h, g, scales, act_order=True, rounder=None):
  rounder = rounder or grid_rounder(scales, w.shape[1], QMIN, QMAX)
  return jax.jit(lambda w, h, g: gpfq(w, h, g, rounder, act_order, 32))(w, h, g)


def on_grid(q, scales):
  u = np.asarray(q / scales)
  return np.allclose(u, np.round(u), atol=1e-4) and np.abs(np.round(u)).max() <= QMAX


@pytest.mark.parametrize("act_order", [True, False])
def test_optq_and_gpfq_beat_rounding_on_correlated_inputs(act_order):
  x, w, scales = correlated_layer()
  h = x.T @ x
  base = output_error(x, w, rounded(w, scales))
  q_optq = run_optq(w, h, scales, act_order)
  q_gpfq = run_gpfq(w, h, h, scales, act_order)
  assert on_grid(q_optq, scales) and on_grid(q_gpfq, scales)
  assert output_error(x, w, q_optq) < 0.8 * base
  assert output_error(x, w, q_gpfq) < 0.85 * base


@pytest.mark.parametrize("act_order", [True, False])
def test_with_uncorrelated_inputs_both_are_exactly_rounding(act_order):
  _, w, scales = correlated_layer()
  h = 3.7 * jnp.eye(w.shape[1])
  expected = np.asarray(rounded(w, scales))
  np.testing.assert_array_equal(np.asarray(run_optq(w, h, scales, act_order)), expected)
  np.testing.assert_array_equal(np.asarray(run_gpfq(w, h, h, scales, act_order)), expected)


def test_gpfq_tracks_the_float_layer_on_float_inputs():
  """With quantized inputs X~ != X, GPFQ's G term aims at X W^T (not X~ W^T)."""
  x, w, scales = correlated_layer(seed=1)
  xq = jnp.round(x * 4) / 4  # coarsely quantized inputs
  h, g = xq.T @ xq, xq.T @ x
  q = run_gpfq(w, h, g, scales)
  target = lambda q: float(jnp.linalg.norm(x @ w.T - xq @ q.T))
  assert target(q) < 0.85 * target(rounded(w, scales))
  assert target(q) < target(run_gpfq(w, h, h, scales))  # ignoring G is worse


def test_dead_inputs_get_zero_weights():
  x, w, scales = correlated_layer()
  x = x.at[:, 5].set(0.0)
  h = x.T @ x
  assert float(jnp.abs(run_optq(w, h, scales)[:, 5]).max()) == 0.0
  assert float(jnp.abs(run_gpfq(w, h, h, scales)[:, 5]).max()) == 0.0


def test_inverse_cholesky_upper_is_the_upper_factor_of_the_inverse():
  x, _, _ = correlated_layer(k=40, rows=200)
  h = np.asarray(x.T @ x, np.float64) + 0.1 * np.eye(40)
  u = np.asarray(inverse_cholesky_upper(jnp.asarray(h, jnp.float32)), np.float64)
  expected = np.linalg.cholesky(np.linalg.inv(h)).T
  np.testing.assert_allclose(u, expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())
  assert np.allclose(u, np.triu(u))


def test_strictly_lower_product_is_the_dense_product():
  a = jax.random.normal(jax.random.key(0), (7, 75))
  lower = jax.random.normal(jax.random.key(1), (75, 75))
  np.testing.assert_allclose(
    strictly_lower_product(a, lower, 16), a @ jnp.tril(lower, -1).T, rtol=1e-4, atol=1e-4
  )


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.floats(0.1, 20.0), st.floats(0.01, 50.0), st.integers(0, 2**31 - 1))
def test_l1_ball_threshold_is_the_exact_projection(n, magnitude, radius, seed):
  v = np.random.default_rng(seed).standard_normal((3, 40)) * magnitude
  v[:, n:] = 0.0  # rows of n entries (zeros never pass a threshold): one compiled shape
  theta = np.asarray(THRESHOLD(jnp.asarray(v, jnp.float32), radius), np.float64)
  shrunk = np.maximum(np.abs(v) - theta[:, None], 0).sum(axis=1)
  inside = np.abs(v).sum(axis=1) <= radius
  assert np.all(theta[inside] == 0)
  np.testing.assert_allclose(shrunk[~inside], radius, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mu, nu", [(0, 15), (-8, 7), (-2, 1)])
def test_budget_bounds_are_exactly_the_weights_that_keep_a_tile_safe(mu, nu):
  limit = 40
  safe = lambda p, n: nu * p + mu * n <= limit and mu * p + nu * n >= -limit
  for p, n in itertools.product(range(0, 12), range(-12, 1)):
    if not safe(p, n):
      continue
    lower, upper = (int(b) for b in budget_bounds(jnp.int32(p), jnp.int32(n), mu, nu, limit))
    allowed = [q for q in range(-20, 21) if safe(p + max(q, 0), n + min(q, 0))]
    assert (lower, upper) == (min(allowed), max(allowed)), (p, n)


def axe(w, scales, bits, tile, spec=A8):
  return accumulator_rounder(w, scales, w.shape[1], QMIN, QMAX, spec, AccumulatorSpec(bits, tile))


@pytest.mark.parametrize("algorithm", ["optq", "gpfq"])
def test_axe_with_a_wide_accumulator_is_exactly_its_base_algorithm(algorithm):
  x, w, scales = correlated_layer()
  h = x.T @ x
  run = run_optq if algorithm == "optq" else lambda w, h, s, **k: run_gpfq(w, h, h, s, **k)
  base = np.asarray(run(w, h, scales))
  for tile in (None, 32):
    constrained = run(w, h, scales, rounder=axe(w, scales, 32, tile))
    np.testing.assert_array_equal(np.asarray(constrained), base)


def tiles_fit(q, scales, spec, bits, tile):
  ints = np.round(np.asarray(q / scales)).astype(np.int64)
  p, n = tile_sums(ints, tile)
  mu, nu = input_range(spec)
  return fits(p, n, mu, nu, bits)


@pytest.mark.parametrize("algorithm", ["optq", "gpfq"])
@pytest.mark.parametrize(
  "spec, bits, tile",
  [(A8, 14, None), (A8, 12, 32), (QuantSpec(bits=6, signed=True), 11, None)],
)
def test_axe_fits_every_row_and_tile_where_its_base_algorithm_overflows(
  algorithm, spec, bits, tile
):
  x, w, scales = correlated_layer(k=128)
  h = x.T @ x
  rounder = axe(w, scales, bits, tile, spec)
  if algorithm == "optq":
    base, constrained = run_optq(w, h, scales), run_optq(w, h, scales, rounder=rounder)
  else:
    base, constrained = run_gpfq(w, h, h, scales), run_gpfq(w, h, h, scales, rounder=rounder)
  assert on_grid(constrained, scales)
  assert tiles_fit(constrained, scales, spec, bits, tile).all()
  assert not tiles_fit(base, scales, spec, bits, tile).all()
  assert not tiles_fit(rounded(w, scales), scales, spec, bits, tile).all()
  # The constraint costs accuracy, but the error feedback still works around it.
  assert output_error(x, w, constrained) < 1.0
