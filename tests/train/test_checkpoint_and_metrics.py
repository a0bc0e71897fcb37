"""Orbax checkpoints of a TrainState and TensorBoard event files."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from efqat_jax import QuantRule, QuantSpec, quantize
from efqat_jax.errors import CorruptCheckpointError
from efqat_jax.models import SmallCNN
from efqat_jax.train import (
  Checkpointer,
  MetricWriter,
  create_train_state,
  make_mesh,
  make_train_step,
  read_scalars,
  replicate,
  shard_batch,
)
from efqat_jax.train.checkpoint_files import FILE_RECORD

X = jax.random.uniform(jax.random.key(0), (8, 12, 12, 1))
Y = jnp.arange(8) % 10
RULE = QuantRule(".*", weight=QuantSpec.for_weights(4), input=QuantSpec.for_activations(4))


def _train(state, step, batch, steps, start=0):
  for i in range(start, steps):
    state, _ = step(state, batch, jax.random.key(i))
  return state


def test_resume_from_checkpoint_reaches_the_uninterrupted_result(tmp_path):
  model = quantize(SmallCNN(features=(8,)), RULE)
  tx = optax.adamw(1e-2, weight_decay=1e-3)
  mesh = make_mesh()
  fresh = lambda: replicate(create_train_state(model.init(jax.random.key(0), X), tx), mesh)
  step = make_train_step(model, tx, mesh)
  batch = shard_batch({"inputs": X, "labels": Y}, mesh)
  uninterrupted = _train(fresh(), step, batch, 6)

  with Checkpointer(tmp_path / "ckpt") as ckpt:
    state = _train(fresh(), step, batch, 3)
    ckpt.save(int(state.step), state, wait=True)
    # ... the process dies here; a new one restores and continues
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.latest_step() == 3
    resumed = ckpt.restore_latest(fresh())
    assert int(resumed.step) == 3
    resumed = _train(resumed, step, batch, 6, start=3)
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(uninterrupted)
  )


def test_restore_without_checkpoint_returns_the_given_state(tmp_path):
  state = {"w": jnp.ones(3)}
  with Checkpointer(tmp_path / "empty") as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.restore_latest(state) is state


def test_checkpointer_keeps_the_last_n(tmp_path):
  with Checkpointer(tmp_path / "c", max_to_keep=2) as ckpt:
    for s in (1, 2, 3):
      ckpt.save(s, {"w": jnp.full(2, float(s))}, wait=True)
    assert ckpt.latest_step() == 3
    restored = ckpt.restore_latest({"w": jnp.zeros(2)})
  np.testing.assert_array_equal(restored["w"], [3.0, 3.0])
  assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.name.isdigit()) == ["2", "3"]
  with pytest.raises(ValueError, match="max_to_keep"):
    Checkpointer(tmp_path / "d", max_to_keep=0)


def _tree(step):
  """A small pytree; ``noise`` has full entropy, so zstd stores its bytes verbatim."""
  noise = np.random.default_rng(step).integers(0, 256, 4096, dtype=np.uint8)
  return {"noise": jnp.asarray(noise), "w": jnp.full(3, float(step))}


def _save_steps(directory, *steps):
  with Checkpointer(directory) as ckpt:
    for step in steps:
      ckpt.save(step, _tree(step), wait=True)


def _data_file(directory, step):
  """The file of checkpoint ``step`` that holds ``noise``'s bytes, and their offset in it."""
  raw = np.asarray(_tree(step)["noise"]).tobytes()
  for path in sorted((directory / str(step)).rglob("*")):
    if path.is_file() and (at := path.read_bytes().find(raw)) >= 0:
      return path, at
  raise AssertionError(f"no file of checkpoint {step} holds the array's bytes")


def _unrecord(directory, step):
  """Removes the checkpoint's record of its files, as a kill right after orbax committed it
  leaves it: orbax then reads it, and the digest of what it read tells the damage."""
  (directory / str(step) / FILE_RECORD).unlink()


def _garble(directory, step):
  """Flips 256 bytes of ``noise``'s data in place (the file record removed)."""
  _unrecord(directory, step)
  path, at = _data_file(directory, step)
  data = bytearray(path.read_bytes())
  data[at + 1024 : at + 1280] = bytes(b ^ 0xFF for b in data[at + 1024 : at + 1280])
  path.write_bytes(bytes(data))


def _truncate(directory, step):
  _unrecord(directory, step)
  path, at = _data_file(directory, step)
  path.write_bytes(path.read_bytes()[: at + 1024])


def _read_unverified(directory, step):
  """Checkpoint ``step``'s state as orbax alone reads it (no digest check)."""
  manager = ocp.CheckpointManager(directory, item_names=("state", "meta"))
  with contextlib.closing(manager):
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return jax.device_get(restored["state"])


# When one read of a restore fails, orbax closes its event loop while TensorStore still completes
# the other reads, whose callbacks then hit the closed loop ("Exception ignored").
orbax_read_failure = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _assert_tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.mark.parametrize(
  "damage, reason", [(_garble, "digest mismatch"), (_truncate, "unreadable")]
)
def test_a_corrupt_checkpoint_is_moved_aside_and_the_older_one_restored(damage, reason, tmp_path):
  directory = tmp_path / "c"
  _save_steps(directory, 1, 2)
  damage(directory, 2)
  if damage is _garble:  # orbax alone reads wrong data without complaint: only the digest tells
    garbled = _read_unverified(directory, 2)["noise"]
    assert (garbled != np.asarray(_tree(2)["noise"])).sum() == 256
  lines = []
  with Checkpointer(directory, report=lines.append) as ckpt:
    _assert_tree_equal(ckpt.restore_latest(_tree(0)), _tree(1))
    assert len(lines) == 1 and "\n" not in lines[0]
    assert f"checkpoint {directory / '2'} is corrupt ({reason}" in lines[0]
    assert lines[0].endswith("resuming from step 1")
    assert not (directory / "2").exists() and (directory / "2.corrupt").is_dir()
    assert ckpt.latest_step() == 1
    ckpt.save(2, _tree(2), wait=True)  # the step can be trained and saved again
    _assert_tree_equal(ckpt.restore_latest(_tree(0)), _tree(2))
  _garble(directory, 2)
  with Checkpointer(directory, report=lines.append) as ckpt:
    _assert_tree_equal(ckpt.read(), _tree(1))
  assert (directory / "2.corrupt-1").is_dir() and len(lines) == 2


@orbax_read_failure
def test_no_intact_checkpoint_raises_naming_the_corrupt_ones(tmp_path):
  directory = tmp_path / "c"
  _save_steps(directory, 1, 2)
  _garble(directory, 1)
  _truncate(directory, 2)
  with Checkpointer(directory, report=pytest.fail) as ckpt:
    with pytest.raises(CorruptCheckpointError) as error:
      ckpt.restore_latest(_tree(0))
    message = str(error.value)
    assert "\n" not in message and f"delete {directory}" in message
    assert f"{directory / '1'} (digest mismatch)" in message and str(directory / "2") in message
    with pytest.raises(CorruptCheckpointError, match="digest mismatch"):
      ckpt.read(1)
  assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]  # left for the user to see


def test_a_checkpoint_without_digest_is_corrupt(tmp_path):
  directory = tmp_path / "c"
  _save_steps(directory, 1)
  manager = ocp.CheckpointManager(directory, item_names=("state", "meta"))
  with contextlib.closing(manager):
    args = ocp.args.Composite(state=ocp.args.StandardSave(_tree(2)), meta=ocp.args.JsonSave({}))
    manager.save(2, args=args)
  lines = []
  with Checkpointer(directory, report=lines.append) as ckpt:
    _assert_tree_equal(ckpt.restore_latest(_tree(0)), _tree(1))
  assert "(no digest)" in lines[0]


def test_metadata_round_trips_and_is_covered_by_the_digest(tmp_path):
  directory = tmp_path / "c"
  with Checkpointer(directory) as ckpt:
    like = _tree(0)
    assert ckpt.restore_latest_with_metadata(like) == (like, None)
    ckpt.save(1, _tree(1), wait=True)
    ckpt.save(2, _tree(2), metadata={"epoch": 3, "seen": (1, 2), "name": "qat"}, wait=True)
    state, metadata = ckpt.restore_latest_with_metadata(like)
  _assert_tree_equal(state, _tree(2))
  assert metadata == {"epoch": 3, "seen": [1, 2], "name": "qat"}
  meta_file = directory / "2" / "meta" / "metadata"
  meta_file.write_text(meta_file.read_text().replace('"epoch": 3', '"epoch": 4'))
  _unrecord(directory, 2)  # else the file record tells first
  lines = []
  with Checkpointer(directory, report=lines.append) as ckpt:
    assert ckpt.restore_latest_with_metadata(like)[1] is None  # step 1, saved without
  assert "(digest mismatch)" in lines[0]


def test_restore_casts_to_the_dtypes_of_like_and_rejects_other_shapes(tmp_path):
  with Checkpointer(tmp_path / "c", report=pytest.fail) as ckpt:
    ckpt.save(1, _tree(1), wait=True)
    like = {**_tree(0), "w": jnp.zeros(3, jnp.bfloat16)}
    restored = ckpt.restore_latest(like)
    assert restored["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored["w"].astype(np.float32), _tree(1)["w"])
    with pytest.raises(ValueError, match="other leaves"):
      ckpt.restore_latest({**_tree(0), "w": jnp.zeros(4)})
    assert ckpt.latest_step() == 1


def test_metric_writer_writes_event_files_that_read_back(tmp_path):
  with MetricWriter(tmp_path / "tb") as writer:
    writer.write(1, {"loss": 2.5, "accuracy": 0.25})
    writer.write(2, {"loss": np.float32(1.5)})
  scalars = read_scalars(tmp_path / "tb")
  assert scalars["loss"] == [(1, 2.5), (2, 1.5)]
  assert scalars["accuracy"] == [(1, 0.25)]


def test_writers_opened_within_one_second_keep_each_others_events(tmp_path):
  for step in (1, 2):  # e.g. a run interrupted and resumed at once
    with MetricWriter(tmp_path / "tb") as writer:
      writer.write(step, {"loss": float(step)})
  assert read_scalars(tmp_path / "tb")["loss"] == [(1, 1.0), (2, 2.0)]


def test_a_checkpoint_missing_a_file_is_corrupt_before_orbax_reads_it(tmp_path, monkeypatch):
  """Each checkpoint records its files' digests: one missing or changed is found without
  orbax reading it (a failed orbax read leaves TensorStore callbacks printing tracebacks)."""
  directory = tmp_path / "c"
  _save_steps(directory, 1, 2)
  (directory / "2" / "state" / "manifest.ocdbt").unlink()
  restore, read_by_orbax = ocp.CheckpointManager.restore, []

  def spied(manager, step, *args, **kwargs):
    read_by_orbax.append(step)
    return restore(manager, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", spied)
  lines = []
  with Checkpointer(directory, report=lines.append) as ckpt:
    _assert_tree_equal(ckpt.restore_latest(_tree(0)), _tree(1))
  assert 2 not in read_by_orbax
  assert lines == [
    f"checkpoint {directory / '2'} is corrupt (file state/manifest.ocdbt is missing); moved it"
    " to 2.corrupt, resuming from step 1"
  ]


def test_metric_writer_writes_a_non_finite_value_without_a_warning(tmp_path, caplog):
  with MetricWriter(tmp_path / "tb") as writer:
    writer.write(1, {"loss": float("nan"), "grad_norm": float("inf")})
  scalars = read_scalars(tmp_path / "tb")
  assert np.isnan(scalars["loss"][0][1]) and scalars["grad_norm"] == [(1, float("inf"))]
  assert caplog.records == []  # the run's error line says it; tensorboardX used to warn too
