"""What a pipeline stage is, and the registry of stages (run in registration order)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections

from efqat_jax.fields import Schema
from efqat_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class ModelState:
  """What a stage hands to the next: the model's variables (on the host) and, from PTQ on,
  the per-layer formats its quantized model was built with."""

  variables: dict
  formats: dict | None = None


@dataclasses.dataclass(frozen=True)
class Stage:
  """A registered stage.

  Attributes:
    run: ``(run, inputs) -> ModelState | None``; ``inputs`` maps each needed stage to its
      output. Trains (or restores) the stage and records its result once.
    needs: ``(config, finished stages) -> names`` of the stages whose outputs it takes.
    fields: ``config -> dotted names`` of the config fields its result depends on, besides the
      run-level ones and those of the stages it needs.
    blocks: ``() -> {block name: schema}``: the config blocks it owns (read when the config is
      built, so that methods registered later bring their fields).
    summary: one line for the field listing.
    check: ``(run) -> None``, raising ConfigError for what the schema cannot check alone
      (layer paths, a method's settings against the model), before any file is written.
  """

  run: Callable[[Any, dict[str, ModelState]], ModelState | None]
  needs: Callable[[ml_collections.ConfigDict, set[str]], tuple[str, ...]]
  fields: Callable[[ml_collections.ConfigDict], tuple[str, ...]]
  summary: str
  blocks: Callable[[], dict[str, Schema]] = dict
  check: Callable[[Any], None] | None = None


STAGES: Registry[Stage] = Registry("stages")
