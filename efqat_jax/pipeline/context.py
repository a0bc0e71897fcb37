"""One pipeline run: its config, workdir, data, model, evaluation and finished results.

Nothing here writes a file until a stage asks for data or records a result; ``check_data``
and ``placeholder_inputs`` work from the dataset's metadata alone, so every check can run first.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from efqat_jax import allocator, data, models
from efqat_jax.errors import ConfigError, DataError
from efqat_jax.fields import Field, boolean, integer, mapping, one_of, text
from efqat_jax.nn import quantize
from efqat_jax.nn.formats import Formats, rules_from_formats
from efqat_jax.pipeline import results_file
from efqat_jax.pipeline.outputs import check_finite
from efqat_jax.pipeline.stage import STAGES
from efqat_jax.train import (
  Checkpointer,
  MetricWriter,
  TrainState,
  make_eval_step,
  make_mesh,
  shard_batch,
)

TASK_FEATURES = {"classification": ("image", "label"), "lm": ("tokens",)}

RUN_FIELDS = {
  "seed": Field(0, "seed of init, data order and dropout", integer(0)),
  "train_seed": Field(
    -1,
    "seed of data order and dropout in the stages after ptq (-1: seed); fp and ptq are reused",
    integer(-1),
  ),
  "stages": Field(
    "fp,ptq,qat,efqat,export",
    "stages to run, comma-separated (a stage a later one needs runs too, and the run says so)",
    text(),
  ),
  "dataset": Field(
    "mnist5k",
    "bundled: mnist5k, digits, shakespeare_char[/seq64]; or a tfds dataset prepared in data_dir",
    text(),
  ),
  "data_dir": Field("", "tfds data dir ('': <workdir>/data)", text()),
  "train_split": Field("train", "split trained and calibrated on (tfds split syntax)", text()),
  "eval_split": Field("test", "split every stage is evaluated on", text()),
  "task": Field(
    "classification",
    "classification (image -> label) or lm (next-token prediction on tokens)",
    one_of(*TASK_FEATURES),
  ),
  "model": Field("cnn", "reference model (efqat_jax.models)", one_of(*models.MODELS)),
  "model_kwargs": Field({}, "keyword arguments of the model", mapping(), free=True),
  "batch_size": Field(64, "training batch size (a multiple of the device count)", integer(1)),
  "eval_batch_size": Field(
    200, "evaluation batch size (a multiple of the device count)", integer(1)
  ),
  "log_every": Field(10, "steps between TensorBoard writes", integer(1)),
  "checkpoint_every": Field(100, "steps between checkpoints", integer(1)),
  "progress": Field(True, "show progress bars", boolean()),
}
# The field a stage lists among its own (``Stage.fields``) to train on ``Run.stage_seed``.
TRAIN_SEED = "train_seed"
# In a stage's result: the digest of its final checkpoint (the stages after it started from it).
CHECKPOINT_DIGEST = "checkpoint_digest"
# The run-level fields every stage's result depends on (the rest only change how it runs).
RESULT_FIELDS = (
  "seed",
  "dataset",
  "train_split",
  "eval_split",
  "task",
  "model",
  "model_kwargs",
  "batch_size",
)


class Run:
  """The state shared by the stages of one run."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
    self.config = config
    self.workdir = pathlib.Path(workdir).absolute()
    self.data_dir = config.data_dir or str(self.workdir / "data")
    try:
      self.model = models.get_model(config.model, **config.model_kwargs)
    except TypeError as e:
      raise ConfigError(
        f"config.model_kwargs = {config.model_kwargs.to_dict()} does not fit {config.model!r}: {e}"
      ) from None
    self.results_path = self.workdir / "results.json"
    self.results: dict[str, Any] = results_file.read(self.results_path)
    self._quantized: dict[str, Any] = {}  # quantized models by their formats' JSON

  # --- data -------------------------------------------------------------------------------

  @functools.cached_property
  def train_info(self) -> data.SplitInfo:
    return _describe(self.config, self.data_dir, "train_split")

  @functools.cached_property
  def eval_info(self) -> data.SplitInfo:
    return _describe(self.config, self.data_dir, "eval_split")

  def check_data(self) -> None:
    """The dataset fits the task and the batch size (from metadata: nothing is prepared)."""
    c = self.config
    for info, split in ((self.train_info, "train_split"), (self.eval_info, "eval_split")):
      missing = [f for f in TASK_FEATURES[c.task] if f not in info.features]
      if missing:
        raise ConfigError(
          f"config.task = {c.task!r} needs {missing} in each example; {c.dataset!r}"
          f" ({split} {c[split]!r}) has {sorted(info.features)}"
        )
      if info.num_examples == 0:
        raise ConfigError(f"config.{split} = {c[split]!r} of {c.dataset!r} has no examples")
    if c.batch_size > self.train_info.num_examples:
      raise ConfigError(
        f"config.batch_size = {c.batch_size} is not allowed: at most the"
        f" {self.train_info.num_examples} examples of {c.dataset!r} {c.train_split!r}"
      )
    devices = jax.device_count()
    for field in ("batch_size", "eval_batch_size"):
      if c[field] % devices:
        raise ConfigError(
          f"config.{field} = {c[field]} is not allowed: a multiple of the {devices} devices"
        )

  def placeholder_inputs(self) -> jax.Array:
    """Zeros shaped like one training batch's inputs (for checks made before data exists)."""
    c, features = self.config, self.train_info.features
    if c.task == "lm":
      shape, dtype = features["tokens"]
      return jnp.zeros((c.batch_size, shape[0] - 1), dtype)
    shape, dtype = features["image"]
    return jnp.zeros((c.batch_size, *shape), jnp.float32)

  @functools.cached_property
  def mesh(self):
    return make_mesh()

  @functools.cached_property
  def train_source(self):
    return data.load(self.config.dataset, self.data_dir, self.config.train_split)

  @functools.cached_property
  def eval_source(self):
    return data.load(self.config.dataset, self.data_dir, self.config.eval_split)

  def to_model_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Dataset features -> ``inputs``, ``labels``, ``mask`` (next-token targets for ``lm``)."""
    if self.config.task == "lm":
      tokens = batch["tokens"]
      return {"inputs": tokens[:, :-1], "labels": tokens[:, 1:], "mask": batch["mask"]}
    return {"inputs": batch["image"], "labels": batch["label"], "mask": batch["mask"]}

  def stage_seed(self, stage: str) -> int:
    """The seed of ``stage``'s data order and dropout: ``train_seed`` if set and the stage
    lists it among its fields (so its fingerprint holds it), else ``seed``."""
    c = self.config
    if c.train_seed >= 0 and TRAIN_SEED in STAGES.get(stage).fields(c):
      return c.train_seed
    return c.seed

  def train_batches(
    self, start_step: int, seed: int | None = None
  ) -> Iterator[dict[str, jax.Array]]:
    """The training batches from step ``start_step`` on, epochs reshuffled by ``seed``
    (default: ``config.seed``)."""
    seed = self.config.seed if seed is None else seed
    steps_per_epoch = len(self.train_source) // self.config.batch_size
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
      epoch_batches = data.batches(
        self.train_source, self.config.batch_size, seed=seed, epoch=epoch
      )
      for i, batch in enumerate(epoch_batches):
        if i >= skip:
          yield shard_batch(self.to_model_batch(batch), self.mesh)
      epoch, skip = epoch + 1, 0

  def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
    batches = data.batches(
      self.eval_source, self.config.eval_batch_size, shuffle=False, drop_remainder=False
    )
    for batch in batches:
      yield shard_batch(self.to_model_batch(batch), self.mesh)

  @functools.cached_property
  def sample_inputs(self) -> jax.Array:
    """The first training batch's inputs (for init, tracing and the export check)."""
    batch = next(data.batches(self.train_source, self.config.batch_size, seed=self.config.seed))
    return jnp.asarray(self.to_model_batch(batch)["inputs"])

  # --- models -----------------------------------------------------------------------------

  def init(self, model) -> dict:
    """``model``'s variables for the sample inputs, seeded by ``config.seed`` (one compiled
    program: eager init would compile every op of the model on its own)."""
    init = jax.jit(lambda key, inputs: model.init(key, inputs, train=False))
    return jax.device_get(init(jax.random.key(self.config.seed), self.sample_inputs))

  def quantized_model(self, formats: Formats):
    """The model with each layer in the format ``formats`` gives it (the rest in float)."""
    key = json.dumps(formats, sort_keys=True)
    if key not in self._quantized:
      self._quantized[key] = quantize(
        self.model, rules_from_formats(formats), weight_estimator=self.config.quant.weight_estimator
      )
    return self._quantized[key]

  # --- evaluation and results -------------------------------------------------------------

  def evaluate(self, model, state: TrainState, stage: str) -> dict[str, float]:
    """Loss and accuracy over the whole eval split (bits per character for ``lm``), also
    written to the stage's TensorBoard directory."""
    eval_step = make_eval_step(model, self.mesh)
    totals = {"loss": 0.0, "accuracy": 0.0, "count": 0.0}
    num_batches = math.ceil(len(self.eval_source) / self.config.eval_batch_size)
    batches = tqdm.tqdm(
      self.eval_batches(),
      total=num_batches,
      desc=f"{stage} eval",
      disable=not self.config.progress,
      leave=False,
    )
    for batch in batches:
      metrics = jax.device_get(eval_step(state, batch))
      count = float(metrics["count"])
      totals["loss"] += float(metrics["loss"]) * count
      totals["accuracy"] += float(metrics["accuracy"]) * count
      totals["count"] += count
    result = {k: totals[k] / totals["count"] for k in ("loss", "accuracy")}
    if self.config.task == "lm":
      result["bits_per_char"] = result["loss"] / math.log(2)
    check_finite(result, f"stage {stage!r}, evaluation on {self.config.eval_split!r}")
    with self.writer(stage) as writer:
      writer.write(int(state.step), {f"eval/{k}": v for k, v in result.items()})
    return result

  def record(self, stage: str, result: dict[str, Any]) -> None:
    """Adds a finished stage's result to ``results.json`` (strict JSON, written atomically),
    with the allocator it ran under (its wall time depends on it, ``efqat_jax.allocator``) and
    the digest of the stage's final checkpoint (if it keeps checkpoints), sealed."""
    check_finite(result, f"stage {stage!r}")
    result = {**result, "allocator": allocator.current()}
    digest = self.checkpoint_digest(stage)
    if digest is not None:
      result = {**result, CHECKPOINT_DIGEST: digest}
    self.results[stage] = results_file.seal(result)
    results_file.write(self.results_path, self.results)

  def has_checkpoints(self, stage: str) -> bool:
    """Whether ``<workdir>/<stage>`` holds a committed checkpoint (a step directory)."""
    directory = self.workdir / stage
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())

  def checkpoint_digest(self, stage: str) -> str | None:
    """The digest of the stage's newest checkpoint, None if it has none."""
    if not self.has_checkpoints(stage):
      return None
    with self.checkpointer(stage) as ckpt:
      return ckpt.latest_digest()

  def checkpointer(self, stage: str) -> Checkpointer:
    return Checkpointer(self.workdir / stage)

  def writer(self, stage: str) -> MetricWriter:
    return MetricWriter(self.workdir / "tb" / stage)


def _describe(config, data_dir: str, split_field: str) -> data.SplitInfo:
  """The split's metadata; a bad dataset or split names the config field."""
  try:
    return data.describe(config.dataset, data_dir, config[split_field])
  except DataError as e:
    field = split_field if str(e).startswith("split ") else "dataset"
    raise ConfigError(f"config.{field}: {e}") from None
