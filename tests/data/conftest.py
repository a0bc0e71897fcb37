"""Bundled datasets, each prepared once per test session into a temporary data dir."""

import pytest

from efqat_jax import data


@pytest.fixture(scope="session")
def prepared(data_dir):
  """``prepared(name)`` -> ``{split: data source}``, built on first request."""
  cache = {}

  def get(name):
    if name not in cache:
      b = data.builder(name, data_dir)
      b.download_and_prepare()
      cache[name] = b.as_data_source()
    return cache[name]

  return get
