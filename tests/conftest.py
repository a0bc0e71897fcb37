"""Shared test settings."""

import hypothesis
import pytest

# jit compilation makes first examples slow: no per-example deadline; few examples keep CI short.
hypothesis.settings.register_profile("efqat", deadline=None, max_examples=40, derandomize=True)
hypothesis.settings.load_profile("efqat")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One tfds data dir for the session: each bundled dataset is prepared once."""
  return str(tmp_path_factory.mktemp("tfds"))
