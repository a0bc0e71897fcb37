"""Lossy coding length: the Ma et al. formula as a float64 log-determinant, through either Gram
matrix; more bits for higher rank; per weight, scale-free."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from efqat_jax.quant.coding_length import coding_length, weight_coding_length

CODING_LENGTH = jax.jit(coding_length)  # distortion traced: one compile per shape
PER_WEIGHT = jax.jit(weight_coding_length, static_argnums=1)


def reference(v, eps):
  """The formula as written, in float64: log-determinant of the n x n matrix."""
  v = np.asarray(v, np.float64)
  m, n = v.shape
  mu = v.mean(axis=0)
  x = v - mu
  _, logdet = np.linalg.slogdet(np.eye(n) + n / (eps**2 * m) * x.T @ x)
  return (m + n) / 2 * logdet / np.log(2) + n / 2 * np.log2(1 + mu @ mu / eps**2)


@settings(deadline=None, max_examples=12)
@given(
  st.sampled_from([(3, 9), (9, 3), (6, 6), (1, 5), (12, 2)]),  # m < n, m > n, square, edges
  st.sampled_from([0.0, 1.5]),
  st.sampled_from([0.05, 0.5, 2.0]),
  st.integers(0, 2**31 - 1),
)
def test_matches_a_float64_log_determinant(shape, mean, eps, seed):
  rng = np.random.default_rng(seed)
  v = rng.standard_normal(shape) * rng.uniform(0.1, 3.0, shape[1]) + mean
  got = float(CODING_LENGTH(jnp.asarray(v, jnp.float32), eps))
  np.testing.assert_allclose(got, reference(v, eps), rtol=1e-4, atol=1e-3)


def test_accurate_for_nearly_low_rank_matrices():
  """The Gram matrix in float32 would lose the small eigenvalues (or fail to factorize)."""
  rng = np.random.default_rng(0)
  v = rng.standard_normal((48, 4)) @ rng.standard_normal((4, 160)) + 1e-4 * rng.standard_normal(
    (48, 160)
  )
  for eps in (1.0, 0.1, 0.01):
    got = float(CODING_LENGTH(jnp.asarray(v, jnp.float32), eps))
    np.testing.assert_allclose(got, reference(v, eps), rtol=1e-4)


@pytest.mark.parametrize("shape", [(16, 24), (24, 16)])
def test_grows_strictly_with_rank_at_equal_frobenius_norm(shape):
  m, n = shape
  rng = np.random.default_rng(1)
  # Left singular vectors orthogonal to the all-ones vector: every rank-k matrix has zero mean.
  basis, _ = np.linalg.qr(np.column_stack([np.ones(m), rng.standard_normal((m, m))]))
  u = basis[:, 1:]
  w, _ = np.linalg.qr(rng.standard_normal((n, n)))
  lengths = []
  for k in range(1, min(m, n) - 1):
    v = u[:, :k] @ w[:, :k].T * np.sqrt(10.0 / k)  # Frobenius norm sqrt(10) for every k
    lengths.append(float(CODING_LENGTH(jnp.asarray(v, jnp.float32), 0.3)))
    np.testing.assert_allclose(lengths[-1], reference(v, 0.3), rtol=1e-4)
  assert all(b > a for a, b in zip(lengths, lengths[1:], strict=False))


def test_weight_coding_length_is_scale_free_and_zero_for_a_zero_kernel():
  rows = np.random.default_rng(2).standard_normal((8, 36)).astype(np.float32)
  base = float(PER_WEIGHT(rows, 0.5))
  np.testing.assert_allclose(
    base, reference(rows / np.sqrt(np.mean(rows**2)), 0.5 * np.sqrt(36)) / rows.size, rtol=1e-4
  )
  for scale in (1e-6, 3.0, -1e6):
    np.testing.assert_allclose(float(PER_WEIGHT(scale * rows, 0.5)), base, rtol=1e-5)
  assert float(PER_WEIGHT(np.zeros((8, 36), np.float32), 0.5)) == 0.0


def test_rejects_a_non_positive_distortion():
  with pytest.raises(ValueError, match="distortion = 0"):
    coding_length(jnp.ones((2, 3)), 0.0)
