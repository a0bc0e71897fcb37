"""TrainState: everything a training step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Params, optimizer state and the model's other variable collections.

  Attributes:
    step: number of optimizer steps taken.
    params: the ``params`` collection (weights and quantization params).
    opt_state: the optimizer's state for ``params``.
    collections: every other variable collection of the model (``batch_stats``,
      ``quant_stats``, ...), updated by the forward pass where the model mutates them.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  collections: dict[str, Any]

  @property
  def variables(self) -> dict[str, Any]:
    """The variables dict to pass to ``model.apply``."""
    return {"params": self.params, **self.collections}


def create_train_state(variables: dict[str, Any], tx: optax.GradientTransformation) -> TrainState:
  """A TrainState at step 0 from ``model.init(...)`` output and an optax optimizer.

  Every array is copied: the state never aliases the caller's ``variables``, so a train step
  that donates the state leaves them usable.

  Args:
    variables: ``{"params": ..., **collections}``, e.g. from ``model.init``.
    tx: the optimizer whose state is initialised for ``variables["params"]``.

  Returns:
    The TrainState.
  """
  variables = jax.tree.map(lambda x: jnp.array(x, copy=True), dict(variables))
  params = variables.pop("params")
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    collections=variables,
  )
