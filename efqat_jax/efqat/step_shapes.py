"""Which compiled step serves a selection: the selection's own counts, or a step already compiled
for counts at least as large, padded.

A train step under ``restrict_backward`` is compiled for the static per-unit counts of the
TrainableSet it gets (its *shape*). When a re-selection only lowers counts (CWPN moving channels
between layers often does), a step compiled earlier for counts at least as large in every unit
can serve it: each unit's channels are padded with index C, which gets no gradient, and the
optimizer's masks (``set_trainable``, built from the real selection) keep every frozen entry
exactly where it was. The padded channels' weight-gradient work is the price; a new compilation
(seconds) is what it saves.

A step over k + padding columns need not round exactly like one over k, so the shapes a stage
has used are part of its state: ``StepShapes.to_json`` / ``from_json`` carry them through a
checkpoint, and a resumed run chooses exactly as the uninterrupted one did.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from efqat_jax.efqat.selection import TrainableSet, weights_per_channel

Counts = tuple[tuple[str, int], ...]  # ((unit, k), ...), as TrainableSet.counts


def dominates(shape: Counts, counts: Counts) -> bool:
  """Whether a step compiled for ``shape`` can serve ``counts``: the same units, and in every
  one at least as many channels."""
  shape = dict(shape)
  return shape.keys() == dict(counts).keys() and all(shape[u] >= k for u, k in counts)


def gradient_size(trainable: TrainableSet, shape: Counts) -> int:
  """How many weight-gradient entries a step of ``shape`` computes for ``trainable``'s layers."""
  per_channel = weights_per_channel({layer.path: layer for layer in trainable.layers})
  return sum(k * per_channel[unit] for unit, k in shape)


def padded_to(trainable: TrainableSet, shape: Counts) -> TrainableSet:
  """``trainable`` as a step compiled for ``shape`` takes it: every unit's channels padded
  with its channel count C (no channel) up to its count in ``shape``.

  For the train step only: what trains (the optimizer's masks) comes from ``trainable``.
  """
  if not dominates(shape, trainable.counts):
    raise ValueError(f"a step shaped {shape} cannot serve the counts {trainable.counts}")
  channels = {
    unit: jnp.concatenate(
      [
        trainable.channels[unit],
        jnp.full(k - trainable.count(unit), trainable.size(unit), jnp.int32),
      ]
    )
    for unit, k in shape
  }
  return dataclasses.replace(trainable, counts=shape, channels=channels)


@dataclasses.dataclass
class StepShapes:
  """The step shapes a stage has used, in order, and the one in use.

  ``reuse``: serve a selection with the cheapest (fewest weight-gradient entries) shape used so
  far that dominates it; without it, or when none does, the selection's own counts."""

  reuse: bool = True
  used: list[Counts] = dataclasses.field(default_factory=list)
  current: Counts | None = None

  def choose(self, trainable: TrainableSet) -> Counts:
    """The shape that serves ``trainable`` (recorded as used and current)."""
    fits = [s for s in self.used if dominates(s, trainable.counts)] if self.reuse else []
    if fits:
      self.current = min(fits, key=lambda s: gradient_size(trainable, s))
    else:
      self.current = trainable.counts
      if trainable.counts not in self.used:
        self.used.append(trainable.counts)
    return self.current

  def to_json(self) -> dict:
    return {"used": [list(map(list, s)) for s in self.used], "current": self.current}

  @classmethod
  def from_json(cls, saved: dict, reuse: bool) -> StepShapes:
    shape = lambda pairs: tuple((unit, int(k)) for unit, k in pairs)
    current = None if saved["current"] is None else shape(saved["current"])
    return cls(reuse, [shape(s) for s in saved["used"]], current)
