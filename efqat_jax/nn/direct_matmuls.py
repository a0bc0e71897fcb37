"""Matmuls and convolutions written directly on a param (``x @ self.param("w", ...)``,
``jnp.einsum("...", x, w)``): found in the traced program, reported, and left in float.

``quantize`` intercepts layers (Dense, DenseGeneral, Conv, Einsum, Embed, and their NNX
counterparts), not ``lax.dot_general`` itself as Qwix does. A layer says which operand is the
weight, which of its axes are output channels and what the op's settings are, and everything
after quantization needs exactly that: EfQAT's per-channel importance and its channel-subset
weight gradient, OPTQ/GPFQ's rows, the integer export and its accumulator proof. A raw
``dot_general`` on a param leaves all of it to guessing (the same param may even be contracted
on different axes at different call sites). So a direct matmul on a param stays float and
``calibrate`` / ``quantize`` warn, naming the param; wrapping it in ``nn.Einsum`` /
``nnx.Einsum`` (a one-line change, the same equation) quantizes it with full support.

A direct use is one whose operand is the param itself, possibly through layout-only operations
(transpose, reshape, dtype conversion, broadcasting, slicing), found through ``jit``, ``remat``,
``scan`` and custom-derivative calls. A quantized layer's kernel reaches its op through the
quantizer, so it never counts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.extend.core import Literal

from efqat_jax.nn.rounding import weight_rounding

_OPS = {"dot_general": "dot_general", "conv_general_dilated": "convolution"}
_LAYOUT = {
  "convert_element_type",
  "transpose",
  "reshape",
  "broadcast_in_dim",
  "squeeze",
  "expand_dims",
  "copy",
  "copy_p",
  "slice",
  "dynamic_slice",
}


def direct_param_ops(fn: Callable[..., Any], params: Any, *args, **kwargs) -> dict[str, str]:
  """``{param path: op}`` for every param that ``fn(params, *args, **kwargs)`` feeds directly
  into a ``dot_general`` or convolution (path ``/``-joined; op ``"dot_general"`` or
  ``"convolution"``). Traced abstractly: nothing is computed."""
  closed = jax.make_jaxpr(lambda p: fn(p, *args, **kwargs))(params)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]  # in the order of the invars
  paths = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves]
  found: dict[str, str] = {}
  _scan(closed.jaxpr, dict(zip(closed.jaxpr.invars, paths, strict=False)), found)
  return found


def _scan(jaxpr, sources: dict, found: dict[str, str]) -> None:
  """Walks ``jaxpr``, following which variables are (layouts of) params (``sources``)."""
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    inputs = [None if isinstance(v, Literal) else sources.get(v) for v in eqn.invars]
    if name in _OPS:
      for path in inputs[:2]:
        if path is not None:
          found.setdefault(path, _OPS[name])
    elif name in _LAYOUT and inputs and inputs[0] is not None:
      sources[eqn.outvars[0]] = inputs[0]
    for sub in _sub_jaxprs(eqn):
      if len(sub.invars) == len(eqn.invars):
        inner = {v: p for v, p in zip(sub.invars, inputs, strict=True) if p is not None}
        if inner:
          _scan(sub, inner, found)


def _sub_jaxprs(eqn) -> list:
  """The jaxprs an equation calls (``pjit``, ``remat``, ``scan``, custom derivatives)."""
  subs = []
  for value in eqn.params.values():
    if hasattr(value, "eqns"):
      subs.append(value)
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
      subs.append(value.jaxpr)
  return subs


def warn_direct_matmuls(
  module: Any, variables: Mapping[str, Any], inputs: tuple, kwargs: Mapping[str, Any], layers
) -> None:
  """Warns, one line per param, about the params ``module.apply(variables, *inputs, **kwargs)``
  feeds directly into a matmul or convolution outside the quantizable layers (``layers()``:
  their paths; a layer that a rule keeps float is the rule's choice, not reported). Traced with
  round to nearest, so that no weight rounding of the caller's runs."""
  run = lambda p: module.apply({**variables, "params": p}, *inputs, **kwargs)
  with weight_rounding(None):
    found = direct_param_ops(run, variables["params"])
    quantizable = set(layers())
  for path, op in sorted(found.items()):
    if path.rpartition("/")[0] in quantizable:
      continue
    warnings.warn(
      f"efqat_jax: the param {path} feeds a {op} directly, not through a layer that quantize"
      " intercepts, so it stays in float; to quantize it, compute it with nn.Einsum / nnx.Einsum"
      " (or Dense / Linear)",
      stacklevel=3,
    )
