"""TensorBoard event files (written with tensorboardX: no TensorFlow needed) and reading them back."""

from __future__ import annotations

import pathlib
import struct
import time
from collections.abc import Mapping

from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2


class MetricWriter:
  """Writes scalars to TensorBoard event files in ``directory``."""

  def __init__(self, directory: str | pathlib.Path):
    # Event files are named by the second they were opened in: without a unique suffix, a
    # writer opened in the same second as an earlier one (a quickly resumed run) overwrites it.
    self._writer = SummaryWriter(str(directory), filename_suffix=f".{time.time_ns()}")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), step)

  def close(self) -> None:
    self._writer.flush()
    self._writer.close()

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
