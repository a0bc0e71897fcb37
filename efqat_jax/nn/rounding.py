"""The weight-rounding hook: how quantized layers round their weights, set from outside.

``weight_rounding(fn)`` sets a ``WeightRounding`` for every quantized op traced inside it
(``efqat_jax.nn.ops.QuantizedOps`` reads it in Mode.QUANTIZE); the default is round to nearest
with the straight-through gradient. Attention Round and other learned roundings plug in here
without editing the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import jax

from efqat_jax.quant.fake_quant import round_ste
from efqat_jax.quant.spec import QuantSpec


@dataclasses.dataclass(frozen=True, eq=False)
class RoundingContext:
  """The weight a ``WeightRounding`` is rounding.

  Attributes:
    path: the layer's module path, ``/``-joined (``QuantizedOps.path``; for a model applied at
      the top level, the key of ``quantized_layers``). The layers of an ``nn.scan`` stack share it.
    weight_name: the weight param (``"kernel"``, or ``"embedding"``).
    spec: the weight's format, axes resolved for the weight being rounded.
    params: the layer's params as the op reads them (one unit's slice inside ``nn.scan`` /
      ``nn.vmap``): per-unit variables of a stacked layer can ride here, next to the weight.
  """

  path: str
  weight_name: str
  spec: QuantSpec
  params: Mapping[str, Any]


WeightRounding = Callable[[jax.Array, RoundingContext], jax.Array]
"""``rounding(u, context) -> grid values``: ``u = w / scale`` (float32, the weight's shape, in grid
units before the zero point) to values of the same shape, clipped to ``[qmin, qmax]`` afterwards.
Gradients flow through it by autodiff: ``d w_hat / d w = rounding'(u)`` inside the range."""


def round_to_nearest(u: jax.Array, context: RoundingContext | None = None) -> jax.Array:
  """The default ``WeightRounding``: ``round(u)`` with the straight-through gradient."""
  del context
  return round_ste(u)


_WEIGHT_ROUNDING: contextvars.ContextVar[tuple[WeightRounding, frozenset[str] | None]] = (
  contextvars.ContextVar("efqat_jax_weight_rounding", default=(round_to_nearest, None))
)


@contextlib.contextmanager
def weight_rounding(
  fn: WeightRounding | None, paths: Collection[str] | None = None
) -> Iterator[None]:
  """Rounds the weights of every quantized op traced inside with ``fn`` (Mode.QUANTIZE only).

  The function is read when a layer is traced: enter the context inside the function that
  ``jax.jit`` compiles (a function traced outside it keeps the rounding it was traced with).
  Input activations, Mode.INTEGER and export always round to nearest. An inner context replaces
  an outer one.

  Args:
    fn: the rounding; None or ``round_to_nearest`` for the default (its custom_vjp path).
    paths: module paths (``RoundingContext.path``) that use ``fn``; the others round to nearest.
      None: every layer.

  Example:
    >>> def soft(u, ctx):  # floor plus a learned offset in [0, 1] per weight (AdaRound style)
    ...   return jnp.floor(u) + jax.nn.sigmoid(offsets[ctx.path])
    >>> def loss(offsets):
    ...   with weight_rounding(soft, paths=offsets):
    ...     return jnp.mean((qmodel.apply(variables, x) - y) ** 2)
    >>> grads = jax.jit(jax.grad(loss))(offsets)
  """
  fn = round_to_nearest if fn is None else fn
  token = _WEIGHT_ROUNDING.set((fn, None if paths is None else frozenset(paths)))
  try:
    yield
  finally:
    _WEIGHT_ROUNDING.reset(token)


def current_weight_rounding(path: str) -> WeightRounding:
  """The ``WeightRounding`` that the layer at ``path`` uses now."""
  fn, paths = _WEIGHT_ROUNDING.get()
  return fn if paths is None or path in paths else round_to_nearest
