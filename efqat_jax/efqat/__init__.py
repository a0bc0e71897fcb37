"""EfQAT: train only the most important channels or layers of a quantized model."""

from efqat_jax.efqat.backward import (
  partial_layers,
  restrict_backward,
  stop_frozen_layers,
)
from efqat_jax.efqat.importance import (
  IMPORTANCES,
  channel_importance,
  unit_scores,
  unit_weights,
)
from efqat_jax.efqat.masking import (
  FreezeState,
  freeze_unselected,
  set_trainable,
  trainable_from_state,
  trainable_masks,
)
from efqat_jax.efqat.reselect import ReselectingStep
from efqat_jax.efqat.selection import CHEAP_PARAMS, MODES, RHO_UNITS, TrainableSet, select

__all__ = [
  "CHEAP_PARAMS",
  "IMPORTANCES",
  "MODES",
  "RHO_UNITS",
  "ReselectingStep",
  "FreezeState",
  "TrainableSet",
  "channel_importance",
  "freeze_unselected",
  "partial_layers",
  "restrict_backward",
  "select",
  "set_trainable",
  "stop_frozen_layers",
  "trainable_from_state",
  "trainable_masks",
  "unit_scores",
  "unit_weights",
]
