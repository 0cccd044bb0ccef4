"""TensorBoard event files of scalars, written without TensorFlow.

An event file is a sequence of TFRecords, each holding one serialized `tensorflow.Event` protobuf.
`EventWriter` writes the records `tf.summary.write` writes for a float32 scalar tagged with the
scalars plugin (TensorBoard's scalar dashboard reads them; tests read them back with TensorFlow's
own reader). TensorFlow's writer cost each trainer start about 3.6 s to import and 1.5 s of eager
ops per run, on every restart (docs/training.md); the few protobuf fields needed are encoded here
instead. Their numbers are those of tensorflow/core/util/event.proto and
tensorflow/core/framework/{summary,tensor,tensor_shape}.proto.

Local files are appended with one `write` per call, so a killed process leaves whole records;
remote ones (gs://) go through workdir.open_append.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from typing import Mapping

import google_crc32c

from recurrentgemma_tpu import workdir as workdir_lib

_FILE_VERSION = b"brain.Event:2"
_DT_FLOAT = 1  # tensorflow.DataType
_SCALARS_PLUGIN = b"scalars"
_names = itertools.count()  # several writers in one process, in one second, get distinct files


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _message(field: int, payload: bytes) -> bytes:
  """A length-delimited field (a string, bytes, a nested message or a packed repeated field)."""
  return _key(field, 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: bytes = b"", summary: bytes = b"") -> bytes:
  # Event: wall_time = 1 (double), step = 2 (int64), file_version = 3, summary = 5 (Summary).
  out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
  return out + (_message(3, file_version) if file_version else b"") + (
      _message(5, summary) if summary else b"")


def _scalar_value(tag: str, value: float) -> bytes:
  # Summary.Value: tag = 1, tensor = 8 (TensorProto: dtype = 1, tensor_shape = 2 (empty: a
  # scalar), tensor_content = 4 (little-endian bytes)), metadata = 9 (SummaryMetadata:
  # plugin_data = 1 (PluginData: plugin_name = 1)).
  tensor = (_key(1, 0) + _varint(_DT_FLOAT) + _message(2, b"")
            + _message(4, struct.pack("<f", value)))
  metadata = _message(1, _message(1, _SCALARS_PLUGIN))
  return _message(1, tag.encode()) + _message(8, tensor) + _message(9, metadata)


def _masked_crc(data: bytes) -> bytes:
  crc = google_crc32c.value(data)
  return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _record(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC-32C, the data, the data's masked CRC-32C."""
  length = struct.pack("<Q", len(data))
  return length + _masked_crc(length) + data + _masked_crc(data)


class EventWriter:
  """Appends scalar events to a new event file in `logdir` (created at the first write)."""

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._file = None

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """One event holding every `tag: value` of `step` (float32, as TensorBoard plots them)."""
    now = time.time()
    summary = b"".join(_message(1, _scalar_value(tag, float(v))) for tag, v in values.items())
    self._write(_record(_event(now, int(step), summary=summary)))

  def _write(self, data: bytes) -> None:
    if self._file is None:
      workdir_lib.makedirs(self.logdir)
      name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
              f"{os.getpid()}.{next(_names)}.v2")
      path = workdir_lib.join(self.logdir, name)
      self._file = workdir_lib.open_append(path, binary=True)
      data = _record(_event(time.time(), 0, file_version=_FILE_VERSION)) + data
    self._file.write(data)

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
