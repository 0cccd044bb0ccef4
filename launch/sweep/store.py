"""Files under a sweep root, on local disk or a bucket (gs://), with two atomic primitives.

- `create_exclusive(path, value)`: create-if-absent. Locally O_CREAT|O_EXCL; on GCS an upload with
  the precondition `ifGenerationMatch=0`, which the server refuses (412) when the object exists.
- `replace_if(path, value, gen)`: compare-and-swap. `gen` is the generation `read_json_gen`
  returned (0: the file must not exist); the write happens only if nobody replaced the file since.
  On GCS the upload carries `ifGenerationMatch=<gen>` (object generations); locally the compare and
  the rename happen under an flock of the file's directory.

Leases (state.py) are built on them. Under gs:// every operation goes through the
google-cloud-storage client (the `sweep` extra): etils.epath has no conditional writes, and one
client for all of a root's state keeps what a driver reads consistent with what it wrote. The
client is recurrentgemma_tpu/gcs.py's (it honours `STORAGE_EMULATOR_HOST`, which the tests point
at a local GCS emulator).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from typing import Any, Iterator

from recurrentgemma_tpu import gcs

Generation = int | str  # GCS: the object's generation; local: inode-mtime-size of the file

def is_gcs(path: str) -> bool:
  return str(path).startswith("gs://")


def join(*parts: str) -> str:
  return "/".join(str(p).rstrip("/") for p in parts)


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
  tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


# ------------------------------------------------------------------------------------ API


def read_json_gen(path: str) -> tuple[Any | None, Generation]:
  """(the JSON in `path` or None, its generation; 0 if the file does not exist)."""
  if is_gcs(path):
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


def read_text(path: str) -> str | None:
  """The text in `path`, or None if it does not exist."""
  if is_gcs(path):
    return _gcs_read(path)[0]
  try:
    with open(path) as f:
      return f.read()
  except FileNotFoundError:
    return None


def read_json(path: str) -> Any | None:
  """The JSON in `path`, or None if it does not exist (or is being replaced and is partial)."""
  return read_json_gen(path)[0]


def write_json(path: str, value: Any) -> None:
  """Replaces `path` atomically (tmp + rename locally; a GCS object write is atomic)."""
  if is_gcs(path):
    _gcs_write(path, _dumps(value), None)
    return
  _local_replace(path, _dumps(value))


def replace_if(path: str, value: Any, gen: Generation) -> Generation | None:
  """Writes `value` only if `path` is still at generation `gen` (0: absent); the new generation,
  or None if another writer got there first."""
  text = _dumps(value)
  if is_gcs(path):
    return _gcs_write(path, text, int(gen))
  with _dir_lock(path):
    if _local_generation(path) != gen:
      return None
    _local_replace(path, text)
    return _local_generation(path)


def create_exclusive(path: str, value: Any) -> bool:
  """Writes JSON to `path` only if no file is there; True if this call created it."""
  text = _dumps(value)
  if is_gcs(path):
    return _gcs_write(path, text, 0) is not None
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(text)
  return True


def listdir(path: str) -> list[str]:
  """Names directly under `path` (files and sub-directories); [] if there is none."""
  if is_gcs(path):
    probe = _blob(join(path, "x"))
    prefix = probe.name[:-1]
    pages = probe.client.list_blobs(probe.bucket, prefix=prefix, delimiter="/")
    names = [b.name[len(prefix):] for b in pages]
    names += [p[len(prefix):].rstrip("/") for p in pages.prefixes]
    return sorted(n for n in names if n)
  if not os.path.isdir(path):
    return []
  return sorted(n for n in os.listdir(path) if ".tmp." not in n)


def exists(path: str) -> bool:
  if is_gcs(path):
    return _blob(path).exists()
  return os.path.exists(path)


def makedirs(path: str) -> None:
  if not is_gcs(path):  # GCS has no directories
    os.makedirs(path, exist_ok=True)
