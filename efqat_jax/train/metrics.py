"""TensorBoard event files (tensorboardX's protos: no TensorFlow needed) and reading them back."""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import struct
import time
from collections.abc import Iterator, Mapping

from tensorboardX.proto import event_pb2, summary_pb2
from tensorboardX.record_writer import masked_crc32c

from efqat_jax.errors import StorageError, storage_reason


def _record(payload: bytes) -> bytes:
  """One TFRecord: ``length (u64), crc of length (u32), payload, crc of payload (u32)``."""
  header = struct.pack("<Q", len(payload))
  crc = lambda data: struct.pack("<I", masked_crc32c(data))
  return header + crc(header) + payload + crc(payload)


class MetricWriter:
  """Writes scalars to a new TensorBoard event file in ``directory``.

  Each write goes to the file at once (TensorBoard shows it live), in the caller's thread: a
  write the file system refuses raises StorageError here. The file is synced on ``close``. A
  non-finite value is written as it is; the run reports it (tensorboardX's writer also logged a
  warning for it).
  """

  def __init__(self, directory: str | pathlib.Path):
    self.directory = pathlib.Path(directory)
    # Event files are named by the second they were opened in: without a unique suffix, a
    # writer opened in the same second as an earlier one (a quickly resumed run) overwrites it.
    now = time.time()
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{time.time_ns()}"
    with self._writing():
      self.directory.mkdir(parents=True, exist_ok=True)
      self._file = open(self.directory / name, "wb")  # noqa: SIM115 (open until close())
    self._append(event_pb2.Event(wall_time=now, file_version="brain.Event:2"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=step)
    for name, value in scalars.items():
      event.summary.value.append(summary_pb2.Summary.Value(tag=name, simple_value=float(value)))
    self._append(event)

  def _append(self, event: event_pb2.Event) -> None:
    with self._writing():
      self._file.write(_record(event.SerializeToString()))
      self._file.flush()

  def close(self) -> None:
    if self._file.closed:
      return
    with self._writing():
      try:
        self._file.flush()
        os.fsync(self._file.fileno())
      finally:
        self._file.close()

  @contextlib.contextmanager
  def _writing(self) -> Iterator[None]:
    """Turns a write the file system refused into StorageError naming the directory."""
    try:
      yield
    except OSError as error:
      reason = storage_reason(error)
      if reason is None:
        raise
      raise StorageError(
        f"cannot write TensorBoard events in {self.directory}: {reason}"
      ) from error

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_scalars(directory: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """All scalars in the event files of ``directory``: ``{tag: [(step, value), ...]}``.

  Event files are TFRecord files: each record is ``length (u64), crc (u32), payload, crc (u32)``
  with a serialized ``Event`` payload.
  """
  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(pathlib.Path(directory).glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset + 12 <= len(data):
      (length,) = struct.unpack_from("<Q", data, offset)
      payload = data[offset + 12 : offset + 12 + length]
      offset += 12 + length + 4
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars
