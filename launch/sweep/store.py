"""The sweep's compare-and-swap records, on local disk or a bucket (gs://): three primitives.

Every other read, write and listing of a sweep root goes through the one file layer of run
directories (recurrentgemma_tpu/workdir.py, gs:// by gcs.py's client); this module adds only what
that layer cannot do, conditional writes:

- `read_json_gen(path)`: the JSON in a file and its generation, what the two writes compare with;
- `create_exclusive(path, value)`: create-if-absent. Locally O_CREAT|O_EXCL; on GCS an upload with
  the precondition `ifGenerationMatch=0`, which the server refuses (412) when the object exists.
- `replace_if(path, value, gen)`: compare-and-swap. `gen` is the generation `read_json_gen`
  returned (0: the file must not exist); the write happens only if nobody replaced the file since.
  On GCS the upload carries `ifGenerationMatch=<gen>` (object generations); locally the compare and
  the rename happen under an flock of the file's directory.

Leases (state.py) are built on them. Under gs:// they go through recurrentgemma_tpu/gcs.py's
google-cloud-storage client (it honours `STORAGE_EMULATOR_HOST`, which the tests point at a local
GCS emulator), the client workdir.py reads gs:// with, so what a driver reads is what it wrote.
Local writes replace the file by a rename of a temporary file that workdir.listdir never lists.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from typing import Any, Iterator

from recurrentgemma_tpu import gcs
from recurrentgemma_tpu import workdir as workdir_lib

Generation = int | str  # GCS: the object's generation; local: inode-mtime-size of the file


def _dumps(value: Any) -> str:
  return json.dumps(value, indent=1, sort_keys=True)


# ------------------------------------------------------------------------------------ GCS


def _gcs_modules():
  try:
    return gcs.modules()
  except RuntimeError as e:
    raise RuntimeError("a gs:// sweep root needs google-cloud-storage (a base dependency) for "
                       "atomic claims: pip install -e .") from e


def _blob(path: str):
  """The client's Blob for a gs:// path (gcs.py's client: one per thread and endpoint)."""
  _gcs_modules()
  return gcs.blob(path)


def _gcs_read(path: str) -> tuple[str | None, Generation]:
  _, exceptions = _gcs_modules()
  blob = _blob(path)
  try:
    data = blob.download_as_bytes()
  except exceptions.NotFound:
    return None, 0
  return data.decode(), int(blob.generation)


def _gcs_write(path: str, text: str, if_generation_match: int | None) -> Generation | None:
  _, exceptions = _gcs_modules()
  blob = _blob(path)
  try:
    blob.upload_from_string(text, content_type="application/json",
                            if_generation_match=if_generation_match)
  except exceptions.PreconditionFailed:
    return None
  return int(blob.generation)


# ------------------------------------------------------------------------------------ local


def _local_generation(path: str) -> Generation:
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return 0
  # Every write is a rename of a new file, so the inode changes with each generation.
  return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


@contextlib.contextmanager
def _dir_lock(path: str) -> Iterator[None]:
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  fd = os.open(directory, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _local_replace(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}{workdir_lib.TMP_SUFFIX}.{os.getpid()}.{threading.get_ident()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


# ------------------------------------------------------------------------------------ API


def read_json_gen(path: str) -> tuple[Any | None, Generation]:
  """(the JSON in `path` or None, its generation; 0 if the file does not exist)."""
  if gcs.is_gcs(path):
    text, gen = _gcs_read(path)
  else:
    gen = _local_generation(path)
    try:
      with open(path) as f:
        text = f.read()
    except FileNotFoundError:
      return None, 0
    if _local_generation(path) != gen:  # replaced while we read: read again
      return read_json_gen(path)
  if text is None:
    return None, 0
  try:
    return json.loads(text), gen
  except json.JSONDecodeError:
    return None, gen








def replace_if(path: str, value: Any, gen: Generation) -> Generation | None:
  """Writes `value` only if `path` is still at generation `gen` (0: absent); the new generation,
  or None if another writer got there first."""
  text = _dumps(value)
  if gcs.is_gcs(path):
    return _gcs_write(path, text, int(gen))
  with _dir_lock(path):
    if _local_generation(path) != gen:
      return None
    _local_replace(path, text)
    return _local_generation(path)


def create_exclusive(path: str, value: Any) -> bool:
  """Writes JSON to `path` only if no file is there; True if this call created it."""
  text = _dumps(value)
  if gcs.is_gcs(path):
    return _gcs_write(path, text, 0) is not None
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(text)
  return True
