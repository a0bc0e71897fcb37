"""Small operations on nested-dict pytrees (Flax variables) shared across the package."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax.traverse_util import empty_node, flatten_dict, unflatten_dict
from jax.sharding import NamedSharding, PartitionSpec


def merge_trees(old: dict, new: dict) -> dict:
  """``old`` with every leaf of ``new`` written over it; nested dicts are merged, not replaced.

  Example:
    >>> merge_trees({"params": {"a": 1, "b": 2}}, {"params": {"b": 3}, "stats": {"c": 4}})
    {'params': {'a': 1, 'b': 3}, 'stats': {'c': 4}}
  """
  flat = flatten_dict(dict(old), keep_empty_nodes=True) if old else {}
  for key, value in (flatten_dict(dict(new), keep_empty_nodes=True) if new else {}).items():
    if value is empty_node:  # an empty dict adds its key only where nothing lies below it
      if not any(k[: len(key)] == key for k in flat):
        flat[key] = value
      continue
    flat = {k: v for k, v in flat.items() if not (v is empty_node and key[: len(k)] == k)}
    flat[key] = value
  return unflatten_dict(flat)


def all_finite(tree: Any) -> bool:
  """Whether every floating-point leaf of ``tree`` is finite."""
  arrays = (np.asarray(x) for x in jax.tree.leaves(tree))  # on the host: no op per leaf
  return all(np.isfinite(a).all() for a in arrays if np.issubdtype(a.dtype, np.floating))


def on_inputs_mesh(tree: Any, inputs: Any) -> Any:
  """``tree`` replicated over the mesh that ``inputs`` are sharded over (unchanged where they
  are not on one mesh): where a compiled step given both puts its outputs, so feeding them back
  reuses the first call's program instead of compiling a second one for the new placement."""
  meshes = {
    leaf.sharding.mesh
    for leaf in jax.tree.leaves(inputs)
    if isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding)
  }
  if len(meshes) != 1:
    return tree
  return jax.device_put(tree, NamedSharding(meshes.pop(), PartitionSpec()))
