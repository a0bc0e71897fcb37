"""Re-selecting the TrainableSet during training, every ``every`` steps.

``ReselectingStep`` wraps a train step ``step(state, batch, rng, trainable)`` (see
``efqat_jax.train.make_train_step(..., param_context=restrict_backward)``) into the ``step(state, batch, rng)`` a training loop calls.
At step 0 and every ``every`` steps after it, it ranks the current params again and installs the
new selection in the ``freeze_unselected`` optimizer state. A selection whose counts fit a
step compiled earlier in the run is served by that step, padded (``efqat_jax.efqat.step_shapes``),
unless ``reuse_steps=False``. On resuming from a checkpoint between two selections it reads the
selection back from that state and the step shapes from the checkpoint's host state
(``host_state`` / ``load_host_state``, which ``efqat_jax.train.train_loop`` saves and restores),
so an interrupted run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from efqat_jax.efqat.masking import set_trainable, trainable_from_state
from efqat_jax.efqat.selection import TrainableSet
from efqat_jax.efqat.step_shapes import StepShapes, padded_to

# selector(variables): the state's variables, {"params": ..., **collections} (``batch_stats``
# for the importances that fold a BatchNorm in).
Selector = Callable[[dict[str, Any]], TrainableSet]
# on_select(step, params, trainable, recompiles): called after every selection; ``recompiles``
# is True when the step shape serving it is new to this process (the step compiles once more).
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
    reuse_steps: serve a selection whose counts fit a step shape used earlier in the run with
      that step, padded, instead of compiling one for its own counts.
  """

  def __init__(
    self,
    step_fn: Callable,
    selector: Selector,
    every: int | None,
    on_select: OnSelect | None = None,
    reuse_steps: bool = True,
  ):
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
      raise ValueError(f"every must be a positive int or None (never re-select), got {every!r}")
    self.step_fn, self.selector, self.every, self.on_select = step_fn, selector, every, on_select
    self.trainable: TrainableSet | None = None  # the selection (what trains)
    self.step_trainable: TrainableSet | None = None  # the selection as the step takes it
    self.shapes = StepShapes(reuse_steps)
    self.compiled_counts: set[tuple] = set()  # step shapes compiled in this process
    self._step: int | None = None

  def host_state(self) -> dict:
    """What a checkpoint keeps beside the train state: the step shapes used so far."""
    return {"step_shapes": self.shapes.to_json()}

  def load_host_state(self, saved: dict | None) -> None:
    """Restores ``host_state()`` as saved with the checkpoint a run resumes from (None: none)."""
    if saved is not None and "step_shapes" in saved:
      self.shapes = StepShapes.from_json(saved["step_shapes"], self.shapes.reuse)

  def __call__(self, state: Any, batch: Any, rng: Any) -> tuple[Any, dict]:
    if self._step is None:  # first call of this run: one host read of the step
      self._step = int(state.step)
      if not self._due(self._step):  # resumed between selections: read it from the state
        layers = {layer.path: layer for layer in self.selector(state.variables).layers}
        self._serve(trainable_from_state(state.opt_state, state.params, layers), resumed=True)
    if self._due(self._step):
      state = self._select(state)
    self._step += 1
    return self.step_fn(state, batch, rng, self.step_trainable)

  def _due(self, step: int) -> bool:
    return step == 0 if self.every is None else step % self.every == 0

  def _serve(self, trainable: TrainableSet, resumed: bool = False) -> bool:
    """Installs ``trainable`` and the step shape that serves it (on resuming, the shape in use
    when the checkpoint was saved); returns whether that shape is new to this process."""
    shape = self.shapes.current if resumed and self.shapes.current else None
    self.trainable = trainable
    self.step_trainable = padded_to(trainable, shape or self.shapes.choose(trainable))
    new = self.step_trainable.counts not in self.compiled_counts
    self.compiled_counts.add(self.step_trainable.counts)
    return new

  def _select(self, state: Any) -> Any:
    recompiles = self._serve(self.selector(state.variables))
    if self.on_select is not None:
      self.on_select(self._step, state.params, self.trainable, recompiles)
    opt_state = set_trainable(state.opt_state, state.params, self.trainable)
    # The new masks take the old ones' placement (e.g. replicated over a mesh): a step
    # compiled for that placement is reused instead of compiled once more.
    masks = jax.tree.map(
      lambda new, old: jax.device_put(new, old.sharding), opt_state.masks, state.opt_state.masks
    )
    return state.replace(opt_state=opt_state._replace(masks=masks))
