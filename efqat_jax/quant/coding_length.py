"""Lossy coding length (Ma, Derksen, Hong, Wright, TPAMI 2007): how many bits code a set of
vectors up to a distortion ``eps``, a measure of how much information a weight matrix holds.

For ``m`` vectors in ``R^n`` (the rows of ``V``), mean ``mu`` and ``X = V - mu``:

  L = ((m + n) / 2) * log2 det(I_n + n / (eps^2 m) * X^T X) + (n / 2) * log2(1 + mu^T mu / eps^2)

By Sylvester's identity ``det(I_n + c X^T X) = det(I_m + c X X^T)``, so the determinant is taken
over the smaller Gram matrix, ``k = min(m, n)`` square. It is computed without forming the Gram
matrix: ``R`` of the QR decomposition of ``[sqrt(c) X; I_k]`` (``X`` or ``X^T``, whichever has
``k`` columns) is a Cholesky factor of ``I_k + c * Gram``, so ``log det = 2 * sum(log|R_ii|)``.
In float32 that is accurate where forming the Gram matrix is not: its rounding errors (about
``2^-24 * c * |Gram|``) swamp the small eigenvalues of nearly low-rank weights, and a Cholesky
factorization of it then fails already at ``eps = 0.1`` times the weights' RMS.

Example:
  >>> rows = to_rows(kernel, out_axes, in_axes)   # [output channels, inputs]
  >>> bits = coding_length(rows, 0.5)             # total bits, a scalar
  >>> per_weight = weight_coding_length(rows, 0.1)  # bits per weight, 10% RMS error per weight
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp


def _check_distortion(distortion) -> None:
  if isinstance(distortion, numbers.Real) and not (math.isfinite(distortion) and distortion > 0):
    raise ValueError(f"distortion = {distortion!r}: the distortion must be finite and > 0")


def log2_det_identity_plus_gram(x: jax.Array, c) -> jax.Array:
  """``log2 det(I + c X^T X)`` of an ``[m, n]`` matrix ``X`` (``c >= 0``), through the smaller
  Gram matrix (Sylvester) and a QR decomposition, in float32."""
  x = jnp.asarray(x, jnp.float32)
  a = x if x.shape[0] >= x.shape[1] else x.T  # [max(m, n), k]: the Gram matrix a^T a is k x k
  k = a.shape[1]
  stacked = jnp.concatenate([jnp.sqrt(jnp.float32(c)) * a, jnp.eye(k, dtype=jnp.float32)])
  with jax.default_matmul_precision("highest"):
    r = jnp.linalg.qr(stacked, mode="r")
  return 2.0 * jnp.sum(jnp.log2(jnp.abs(jnp.diagonal(r))))


def coding_length(vectors: jax.Array, distortion: float) -> jax.Array:
  """Total bits to code the rows of ``vectors`` (``[m, n]``: m vectors in ``R^n``) up to the
  mean squared distortion ``distortion^2`` per vector (Ma et al. 2007):

    ``((m + n)/2) log2 det(I_n + n/(eps^2 m) X^T X) + (n/2) log2(1 + mu^T mu / eps^2)``

  with ``mu`` the mean row and ``X = vectors - mu``. The log-determinant is the one of the
  ``min(m, n)``-square Gram matrix (``det(I_n + c X^T X) = det(I_m + c X X^T)``). A scalar,
  float32; ``distortion`` must be > 0 (checked when it is a Python number).

  Example:
    >>> coding_length(jnp.zeros((4, 3)), 1.0)                 # nothing to code
    Array(0., dtype=float32)
    >>> coding_length(jax.random.normal(key, (64, 16)), 0.1)  # grows as eps shrinks
  """
  _check_distortion(distortion)
  v = jnp.asarray(vectors, jnp.float32)
  if v.ndim != 2:
    raise ValueError(f"vectors of shape {v.shape}: expected [m vectors, n dimensions]")
  m, n = v.shape
  mu = jnp.mean(v, axis=0)
  eps2 = jnp.square(jnp.float32(distortion))
  logdet = log2_det_identity_plus_gram(v - mu, n / m / eps2)
  return 0.5 * (m + n) * logdet + 0.5 * n * jnp.log2(1.0 + jnp.sum(mu * mu) / eps2)


def weight_coding_length(rows: jax.Array, distortion: float) -> jax.Array:
  """Coding length per weight of one layer's kernel as rows ``[output channels, inputs]`` (see
  ``rows.to_rows``), each row a vector, at an RMS error per weight of ``distortion`` times the
  kernel's RMS: ``coding_length(rows / rms, distortion * sqrt(inputs)) / rows.size``. Scale-free
  (a kernel times a constant codes in as many bits) and comparable across layers of different
  widths; an all-zero kernel gives 0.

  Example:
    >>> rows = to_rows(kernel, *kernel_axes("conv", dn, kernel.ndim))
    >>> weight_coding_length(rows, 0.1)  # == weight_coding_length(3.0 * rows, 0.1)
  """
  _check_distortion(distortion)
  rows = jnp.asarray(rows, jnp.float32)
  peak = jnp.max(jnp.abs(rows))
  unit = rows / jnp.where(peak > 0, peak, 1.0)  # no overflow in the squares
  rms = jnp.sqrt(jnp.mean(jnp.square(unit)))
  normalized = unit / jnp.where(rms > 0, rms, 1.0)
  return coding_length(normalized, distortion * math.sqrt(rows.shape[1])) / rows.size
