"""Labeled image tables (CSV rows of pixels then label): locate, parse, validate and split."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np


def package_data_file(package: str, *parts: str, pip_name: str | None = None) -> pathlib.Path:
  """Path of a data file shipped inside an installed package, without importing the package.

  Args:
    package: top-level import name, e.g. ``"sklearn"``.
    *parts: path components below the package directory.
    pip_name: distribution name for the error message (defaults to ``package``).

  Returns:
    The existing file's path.
  """
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      f"package {package!r} is not installed; `pip install {pip_name or package}` provides "
      f"{'/'.join(parts)}"
    )
  path = pathlib.Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found in the installed {package!r} package")
  return path


def read_table(path: str | pathlib.Path) -> np.ndarray:
  """Reads a (gzipped) comma-separated numeric table as float64, shape (rows, columns)."""
  return np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)


def parse_labeled_images(
  table: np.ndarray, image_shape: tuple[int, ...], max_value: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
  """Validates rows ``[pixel_0, ..., pixel_{P-1}, label]`` and splits them into images and labels.

  Args:
    table: float array (rows, P + 1).
    image_shape: shape of one image; its size must be P.
    max_value: largest allowed pixel value (pixels are integers in ``[0, max_value]``).
    num_classes: labels must be integers in ``[0, num_classes)``.

  Returns:
    ``(images, labels)``: uint8 (rows, *image_shape) and int64 (rows,).

  Raises:
    ValueError: naming the problem (empty table, wrong column count, NaN / non-integer /
      out-of-range pixels, non-integer or out-of-range labels).
  """
  table = np.asarray(table, dtype=np.float64)
  num_pixels = int(np.prod(image_shape))
  if table.ndim != 2 or table.shape[0] == 0:
    raise ValueError(f"image table is empty or not 2-D (shape {table.shape})")
  if table.shape[1] != num_pixels + 1:
    raise ValueError(
      f"image table has {table.shape[1]} columns, expected {num_pixels} pixels + 1 label"
    )
  pixels, labels = table[:, :-1], table[:, -1]
  _check_integers(pixels, "pixel", 0, max_value)
  _check_integers(labels, "label", 0, num_classes - 1)
  images = pixels.astype(np.uint8).reshape((-1, *image_shape))
  return images, labels.astype(np.int64)


def _check_integers(values: np.ndarray, what: str, lo: int, hi: int) -> None:
  bad = ~np.isfinite(values)
  if bad.any():
    row = int(np.argwhere(bad)[0][0])
    raise ValueError(f"{what} values contain NaN/inf (first in row {row})")
  bad = values != np.round(values)
  if bad.any():
    row = int(np.argwhere(bad)[0][0])
    raise ValueError(f"{what} values must be integers, got {values[bad][0]!r} (row {row})")
  bad = (values < lo) | (values > hi)
  if bad.any():
    row = int(np.argwhere(bad)[0][0])
    raise ValueError(f"{what} values must be in [{lo}, {hi}], got {values[bad][0]:g} (row {row})")


def stratified_split(
  labels: np.ndarray, num_test: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """A fixed, seeded split whose test part keeps the class proportions.

  Each class gets ``num_test * n_c / n`` test rows, rounded down, and the leftover rows go to
  the classes with the largest remainders (ties to the smaller class id). Within a class the
  test rows are the first of a seeded permutation.

  Args:
    labels: int array (n,).
    num_test: size of the test part, ``0 < num_test < n``.
    seed: seed of the permutation.

  Returns:
    ``(train_indices, test_indices)``, each sorted, together a partition of ``range(n)``.
  """
  labels = np.asarray(labels)
  n = labels.shape[0]
  if not 0 < num_test < n:
    raise ValueError(f"num_test must be in (0, {n}), got {num_test}")
  classes, counts = np.unique(labels, return_counts=True)
  exact = num_test * counts / n
  quota = np.floor(exact).astype(np.int64)
  order = np.lexsort((classes, -(exact - quota)))
  quota[order[: num_test - quota.sum()]] += 1
  rng = np.random.default_rng(seed)
  test = np.concatenate(
    [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota, strict=True)]
  )
  is_test = np.zeros(n, dtype=bool)
  is_test[test] = True
  return np.flatnonzero(~is_test), np.flatnonzero(is_test)
