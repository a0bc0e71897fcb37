"""Input pipeline: seeded epoch shuffling, drop vs pad with mask, sharding, image scaling."""

import jax
import numpy as np
import pytest

from efqat_jax import data


def _source(n=10):
  return [{"image": np.full((2, 2, 1), i, np.uint8), "label": i} for i in range(n)]


def _labels(batches):
  return np.concatenate([b["label"][b["mask"]] for b in batches]).tolist()


def test_shuffle_is_deterministic_per_seed_and_differs_across_epochs_and_seeds():
  run = lambda seed, epoch: _labels(data.batches(_source(50), 8, seed=seed, epoch=epoch))
  assert run(0, 0) == run(0, 0)
  assert run(0, 0) != run(0, 1)
  assert run(0, 0) != run(1, 0)
  assert len(set(run(0, 0))) == 48


def test_no_shuffle_keeps_source_order():
  assert _labels(data.batches(_source(), 4, shuffle=False, drop_remainder=False)) == list(range(10))


def test_drop_remainder_drops_the_short_batch():
  out = list(data.batches(_source(), 4, drop_remainder=True, seed=3))
  assert len(out) == 2 and all(b["mask"].all() and b["label"].shape == (4,) for b in out)
  # The same epoch without the short last batch: 8 distinct examples, in the same order.
  padded = list(data.batches(_source(), 4, drop_remainder=False, seed=3))
  assert _labels(out) == _labels(padded[:2]) and len(set(_labels(out))) == 8


def test_pad_keeps_every_example_once_and_masks_the_padding():
  out = list(data.batches(_source(), 4, drop_remainder=False, seed=3))
  assert len(out) == 3 and all(b["image"].shape == (4, 2, 2, 1) for b in out)
  assert out[-1]["mask"].tolist() == [True, True, False, False]
  assert out[-1]["label"][2:].tolist() == [0, 0]
  assert sorted(_labels(out)) == list(range(10))


def test_images_become_float32_divided_by_pixel_max():
  batch = next(data.batches(_source(), 10, shuffle=False, pixel_max=9))
  assert batch["image"].dtype == np.float32
  assert batch["image"].min() == 0.0 and batch["image"].max() == 1.0
  assert batch["label"].dtype.kind == "i"
  # Example i is the constant image i: a division by pixel_max, not a per-batch min-max rescale.
  batch = next(data.batches(_source(), 10, shuffle=False, pixel_max=12))
  want = np.arange(10, dtype=np.float32)[:, None, None, None] / np.float32(12)
  np.testing.assert_array_equal(batch["image"], np.broadcast_to(want, (10, 2, 2, 1)))


def test_sharding_reshapes_the_leading_axis():
  out = list(data.batches(_source(), 4, drop_remainder=False, shard_devices=True, num_devices=2))
  assert out[0]["image"].shape == (2, 2, 2, 2, 1)
  assert out[-1]["mask"].shape == (2, 2) and out[-1]["label"].shape == (2, 2)
  # Device d gets rows [2d, 2d + 2) of the unsharded batch: contiguous blocks, not interleaved.
  flat = list(data.batches(_source(), 4, drop_remainder=False))
  assert len(out) == len(flat)
  for sharded, batch in zip(out, flat, strict=True):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(sharded[key][1], batch[key][2:])
      np.testing.assert_array_equal(sharded[key].reshape(batch[key].shape), batch[key])
  local = next(data.batches(_source(), 4, shard_devices=True))
  assert local["image"].shape == (jax.local_device_count(), 4 // jax.local_device_count(), 2, 2, 1)


def test_batch_not_divisible_by_devices_raises():
  with pytest.raises(ValueError, match="does not divide over 3 devices"):
    next(data.batches(_source(), 4, shard_devices=True, num_devices=3))
  with pytest.raises(ValueError, match="does not divide over 3 devices"):
    data.shard({"x": np.zeros((4, 2))}, 3)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_bad_batch_size_raises(batch_size):
  with pytest.raises(ValueError, match="batch_size"):
    next(data.batches(_source(), batch_size))


def test_real_digits_batches_scale_by_the_stored_pixel_max(prepared):
  source = prepared("digits")["train"]
  out = list(data.batches(source, 128, seed=0, epoch=0, drop_remainder=False))
  assert len(out) == 12 and int(sum(b["mask"].sum() for b in out)) == 1437
  images = np.concatenate([b["image"] for b in out])
  assert images.dtype == np.float32 and images.min() == 0.0 and images.max() == 1.0
  assert out[0]["image"].shape == (128, 8, 8, 1) and out[0]["label"].dtype.kind == "i"
  # Every real example is its stored uint8 image divided by the stored pixel_max (16).
  ordered = list(data.batches(source, 128, shuffle=False, drop_remainder=False))
  images = np.concatenate([b["image"][b["mask"]] for b in ordered])
  raw = np.stack([e["image"] for e in source.__getitems__(list(range(len(source))))])
  assert source.dataset_info.metadata["pixel_max"] == 16
  np.testing.assert_array_equal(images, raw.astype(np.float32) / np.float32(16))
