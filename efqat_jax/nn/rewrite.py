"""Running a Flax layer with QuantizedOps, without editing its code.

Three ways in, by layer kind:
  - ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv`` (and subclasses): their op is a field
    (``dot_general`` / ``conv_general_dilated``); a twin of the layer with QuantizedOps in that
    field runs on the layer's own scope, so every feature of the layer is kept.
  - ``nn.Einsum``: its ``__call__`` is re-run with the einsum as one quantized dot_general.
  - ``nn.Embed``: the lookup (``__call__``) and the tied output projection (``attend``) use the
    table quantized per row (``embedding_scale``); the lookup's ids are not quantized.
A layer of these kinds that overrides the method being called cannot be rewritten this way.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from efqat_jax.nn.ops import QuantizedOps

OP_FIELDS = {
  nn.Dense: "dot_general",
  nn.DenseGeneral: "dot_general",
  nn.Conv: "conv_general_dilated",
}
# Kinds rewritten by re-running their method, with the methods that use the weight.
METHODS = {nn.Einsum: ("__call__",), nn.Embed: ("__call__", "attend")}


def op_field(module: nn.Module) -> str | None:
  """Name of the op field of a Dense/DenseGeneral/Conv layer, or None for other modules."""
  for cls, field in OP_FIELDS.items():
    if isinstance(module, cls):
      return field
  return None


def quantizable_method(module: nn.Module, method: str) -> bool:
  """Whether ``module.method(...)`` computes with a weight that can be quantized."""
  if op_field(module) is not None:
    return method == "__call__"
  return any(isinstance(module, cls) and method in names for cls, names in METHODS.items())


def why_not_rewritable(module: nn.Module, method: str) -> str | None:
  """Why ``module.method`` cannot run quantized, or None if it can."""
  field = op_field(module)
  if field is not None:
    if getattr(module, field) is not None or getattr(module, f"{field}_cls", None) is not None:
      return f"it already sets a custom {field}"
    return None
  base = next(cls for cls in METHODS if isinstance(module, cls))
  if getattr(type(module), method) is not getattr(base, method):
    return f"{type(module).__name__} overrides {base.__name__}.{method}"
  return None


def is_quantized(module: nn.Module) -> bool:
  """Whether a Dense/DenseGeneral/Conv layer already computes with QuantizedOps."""
  field = op_field(module)
  return field is not None and isinstance(
    getattr(getattr(module, field), "__self__", None), QuantizedOps
  )


def call_quantized(module: nn.Module, method: str, ops_fields: dict, *args, **kwargs):
  """Runs ``module.method(*args, **kwargs)`` computing with QuantizedOps on its own scope.

  Args:
    module: a bound Dense, DenseGeneral, Conv, Einsum or Embed (or a subclass).
    method: ``"__call__"``, or ``"attend"`` for an Embed.
    ops_fields: keyword arguments of QuantizedOps besides ``scope`` and ``weight_name``.
    *args: the method's arguments.
    **kwargs: the method's keyword arguments.

  Raises:
    ValueError: if the layer cannot run quantized (see ``why_not_rewritable``), or never
      called its op (it would silently stay in float).
  """
  path = "/".join(module.scope.path)
  reason = why_not_rewritable(module, method)
  if reason is not None:
    raise ValueError(f"cannot quantize {path}: {reason}")
  if isinstance(module, nn.Embed):
    ops = QuantizedOps(scope=module.scope, weight_name="embedding", **ops_fields)
    return _embed(module, ops, method, *args, **kwargs)
  ops = QuantizedOps(scope=module.scope, **ops_fields)
  if isinstance(module, nn.Einsum):
    return _einsum(module, ops, *args, **kwargs)
  return run_with_ops(module, type(module), ops, *args, **kwargs)


def run_with_ops(module: nn.Module, float_cls: type[nn.Module], ops: QuantizedOps, *args, **kwargs):
  """Runs ``float_cls.__call__`` on ``module``'s fields and scope, with ``ops`` as its op.

  Args:
    module: a bound Dense, DenseGeneral or Conv (or a subclass).
    float_cls: the class whose ``__call__`` runs (``type(module)`` or its Flax base).
    ops: the QuantizedOps bound to ``module.scope``.
    *args: the layer's call arguments.
    **kwargs: the layer's call keyword arguments.
  """
  field = op_field(module)
  fields = {
    f.name: getattr(module, f.name)
    for f in dataclasses.fields(float_cls)
    if f.init and f.name not in ("parent", "name")
  }
  fields[field] = getattr(ops, field)
  out = float_cls(**fields, parent=module.scope)(*args, **kwargs)
  if not ops.calls:
    raise ValueError(
      f"cannot quantize {ops.path}: {float_cls.__name__}.__call__ never called its {field}, so"
      " it would silently stay in float"
    )
  return out


def _einsum(module: nn.Einsum, ops: QuantizedOps, inputs, einsum_str: str | None = None):
  """``nn.Einsum.__call__`` with the einsum computed by ``ops``."""
  einsum_str = nn.merge_param("einsum_str", module.einsum_str, einsum_str).replace(" ", "")
  kernel = module.param("kernel", module.kernel_init, module.shape, module.param_dtype)
  bias = None
  if module.use_bias:
    bias_shape, broadcast_shape = module._get_bias_shape(einsum_str, inputs, kernel)
    bias = module.param("bias", module.bias_init, bias_shape, module.param_dtype)
  inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
  y = ops.einsum(einsum_str, inputs, kernel, module.precision, module.preferred_element_type)
  return y if bias is None else y + jnp.reshape(bias, broadcast_shape)


def _embed(module: nn.Embed, ops: QuantizedOps, method: str, x):
  """``nn.Embed.__call__`` (lookup) or ``attend`` with the table quantized by ``ops``."""
  if method == "attend":
    query, table = module.promote_dtype(x, module.embedding, dtype=module.dtype)
    return ops.dot_general(query, table, (((query.ndim - 1,), (1,)), ((), ())))
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError("Input type must be an integer or unsigned integer.")
  (table,) = module.promote_dtype(module.embedding, dtype=module.dtype, inexact=False)
  return ops.take(table, x)
