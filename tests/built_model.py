"""A quantized test model whose variables and layers are built on first use.

Building them compiles; built at a module's top they would be built while pytest collects, in
every test process, whether or not it runs that module's tests.
"""

import functools

import jax

from efqat_jax.nn import quantized_layers


class BuiltModel:
  """``model`` (quantized) initialised on ``x`` with key 0: ``.variables``, ``.params`` and
  ``.layers`` (``quantized_layers``), each computed once, when first read."""

  def __init__(self, model, x):
    self.model, self.x = model, x

  @functools.cached_property
  def variables(self) -> dict:
    return jax.jit(self.model.init)(jax.random.key(0), self.x)  # one program, not one per op

  @property
  def params(self) -> dict:
    return self.variables["params"]

  @functools.cached_property
  def layers(self) -> dict:
    return quantized_layers(self.model, self.variables, self.x)
