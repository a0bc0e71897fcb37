"""Shared test settings."""

import hypothesis

# jit compilation makes first examples slow: no per-example deadline; few examples keep CI short.
hypothesis.settings.register_profile("efqat", deadline=None, max_examples=40, derandomize=True)
hypothesis.settings.load_profile("efqat")
