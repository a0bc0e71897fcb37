"""Numpy batches from a random-access data source: seeded shuffling, padding, device sharding."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

Batch = dict[str, np.ndarray]


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """A permutation of ``range(num_examples)`` fixed by ``(seed, epoch)``; differs per epoch."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(
  num_examples: int,
  batch_size: int,
  *,
  seed: int = 0,
  epoch: int = 0,
  shuffle: bool = True,
  drop_remainder: bool = True,
) -> list[np.ndarray]:
  """Indices of each batch of one epoch; the last may be short if ``drop_remainder`` is False."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  order = epoch_permutation(num_examples, seed, epoch) if shuffle else np.arange(num_examples)
  stop = num_examples - num_examples % batch_size if drop_remainder else num_examples
  return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def collate(examples: Sequence[Mapping[str, Any]]) -> Batch:
  """Stacks a list of example dicts into a dict of arrays with a leading batch axis."""
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


def pad_batch(batch: Batch, batch_size: int) -> Batch:
  """Pads every array with zeros to ``batch_size`` rows and adds ``mask`` (True = real row)."""
  n = len(next(iter(batch.values())))
  padded = {
    k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)])
    for k, v in batch.items()
  }
  padded["mask"] = np.arange(batch_size) < n
  return padded


def scale_images(batch: Batch, pixel_max: float, key: str = "image") -> Batch:
  """Converts ``batch[key]`` (if present) to float32 in ``[0, 1]`` by dividing by ``pixel_max``."""
  if key not in batch:
    return batch
  return {**batch, key: batch[key].astype(np.float32) / np.float32(pixel_max)}


def shard(batch: Batch, num_devices: int) -> Batch:
  """Reshapes the leading axis ``B`` of every array to ``(num_devices, B // num_devices)``.

  Raises:
    ValueError: if ``B`` is not divisible by ``num_devices``.
  """
  out = {}
  for k, v in batch.items():
    if v.shape[0] % num_devices:
      raise ValueError(
        f"batch of {v.shape[0]} (array {k!r}) does not divide over {num_devices} devices; "
        "use a batch_size that is a multiple of the device count"
      )
    out[k] = v.reshape(num_devices, v.shape[0] // num_devices, *v.shape[1:])
  return out


def _read(source: Any, indices: np.ndarray) -> Sequence[Mapping[str, Any]]:
  keys = [int(i) for i in indices]
  if hasattr(source, "__getitems__"):  # tfds data sources read a batch of records at once
    return source.__getitems__(keys)
  return [source[i] for i in keys]


def pixel_max_of(source: Any, default: float = 255.0) -> float:
  """``pixel_max`` from the source's ``dataset_info.metadata`` (set by this package's builders)."""
  info = getattr(source, "dataset_info", None)
  metadata = getattr(info, "metadata", None) or {}
  return float(metadata.get("pixel_max", default))


def batches(
  source: Any,
  batch_size: int,
  *,
  seed: int = 0,
  epoch: int = 0,
  shuffle: bool = True,
  drop_remainder: bool = True,
  shard_devices: bool = False,
  num_devices: int | None = None,
  pixel_max: float | None = None,
  image_key: str = "image",
) -> Iterator[Batch]:
  """Yields one epoch of numpy batches from a random-access source (e.g. ``tfds.data_source``).

  Every batch has a bool ``mask`` (True for real examples). Images under ``image_key`` become
  float32 in ``[0, 1]``.

  Args:
    source: supports ``len`` and ``source[i]`` returning a dict of arrays.
    batch_size: examples per batch (over all devices when sharded).
    seed: shuffling seed; with ``epoch`` it fixes the order.
    epoch: epoch number; each epoch gets a different permutation.
    shuffle: if False, examples come in source order.
    drop_remainder: drop the last short batch (True) or zero-pad it to ``batch_size``.
    shard_devices: reshape every array to ``(devices, batch_size // devices, ...)``.
    num_devices: device count when sharding; defaults to ``jax.local_device_count()``.
    pixel_max: value mapped to 1.0; defaults to ``pixel_max_of(source)``.
    image_key: the feature holding images.

  Returns:
    An iterator of ``{feature: array, "mask": bool array}``.

  Example:
    >>> for batch in batches(load("digits", data_dir, "train"), 32, epoch=e): ...
  """
  devices = (num_devices or jax.local_device_count()) if shard_devices else 1
  if shard_devices and batch_size % devices:
    raise ValueError(
      f"batch_size {batch_size} does not divide over {devices} devices; use a multiple of {devices}"
    )
  scale = pixel_max_of(source) if pixel_max is None else pixel_max
  for idx in batch_indices(
    len(source), batch_size, seed=seed, epoch=epoch, shuffle=shuffle, drop_remainder=drop_remainder
  ):
    batch = pad_batch(collate(_read(source, idx)), batch_size)
    batch = scale_images(batch, scale, image_key)
    yield shard(batch, devices) if shard_devices else batch
