"""Re-selecting the TrainableSet during training, every ``every`` steps.

``ReselectingStep`` wraps a train step ``step(state, batch, rng, trainable)`` (see
``efqat_jax.train.make_train_step(..., param_context=restrict_backward)``) into the ``step(state, batch, rng)`` a training loop calls.
At step 0 and every ``every`` steps after it, it ranks the current params again and installs the
new selection in the ``freeze_unselected`` optimizer state. On resuming from a checkpoint
between two selections it reads the selection back from that state, so an interrupted run
continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from efqat_jax.efqat.masking import set_trainable, trainable_from_state
from efqat_jax.efqat.selection import TrainableSet

# selector(variables): the state's variables, {"params": ..., **collections} (``batch_stats``
# for importance="bn_folded").
Selector = Callable[[dict[str, Any]], TrainableSet]
# on_select(step, params, trainable, recompiles): called after every selection; ``recompiles``
# is True when the selection's static counts are new to this run (the step compiles once more).
OnSelect = Callable[[int, Any, TrainableSet, bool], None]


class ReselectingStep:
  """``step(state, batch, rng)`` that trains the TrainableSet chosen by ``selector``.

  Args:
    step_fn: a jitted ``(state, batch, rng, trainable) -> (state, metrics)`` whose optimizer is
      a ``freeze_unselected`` wrapper (``state.opt_state`` is its FreezeState).
    selector: ``variables -> TrainableSet``, given the state's variables
      (``{"params": ..., "batch_stats": ...}``), e.g.
      ``lambda v: select(v["params"], layers, "cwpl", 0.1)``.
    every: steps between selections; None selects once, at step 0.
    on_select: optional callback after each selection (logging).
  """

  def __init__(
    self,
    step_fn: Callable,
    selector: Selector,
    every: int | None,
    on_select: OnSelect | None = None,
  ):
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
      raise ValueError(f"every must be a positive int or None (never re-select), got {every!r}")
    self.step_fn, self.selector, self.every, self.on_select = step_fn, selector, every, on_select
    self.trainable: TrainableSet | None = None
    self.compiled_counts: set[tuple] = set()
    self._step: int | None = None

  def __call__(self, state: Any, batch: Any, rng: Any) -> tuple[Any, dict]:
    if self._step is None:  # first call of this run: one host read of the step
      self._step = int(state.step)
      if not self._due(self._step):  # resumed between selections: read it from the state
        layers = {layer.path: layer for layer in self.selector(state.variables).layers}
        self.trainable = trainable_from_state(state.opt_state, state.params, layers)
        self.compiled_counts.add(self.trainable.counts)
    if self._due(self._step):
      state = self._select(state)
    self._step += 1
    return self.step_fn(state, batch, rng, self.trainable)

  def _due(self, step: int) -> bool:
    return step == 0 if self.every is None else step % self.every == 0

  def _select(self, state: Any) -> Any:
    self.trainable = self.selector(state.variables)
    recompiles = self.trainable.counts not in self.compiled_counts
    self.compiled_counts.add(self.trainable.counts)
    if self.on_select is not None:
      self.on_select(self._step, state.params, self.trainable, recompiles)
    opt_state = set_trainable(state.opt_state, state.params, self.trainable)
    # The new masks take the old ones' placement (e.g. replicated over a mesh): a step
    # compiled for that placement is reused instead of compiled once more.
    masks = jax.tree.map(
      lambda new, old: jax.device_put(new, old.sharding), opt_state.masks, state.opt_state.masks
    )
    return state.replace(opt_state=opt_state._replace(masks=masks))
