"""Object storage (gs://): the one place that builds the google-cloud-storage client.

Jax-free, so launch/ (sweep state, preflight) and the data pipeline share it. The client honours
`STORAGE_EMULATOR_HOST` (the tests point it at fake-gcs-server). One client per thread and
endpoint: the client's HTTP session is not documented as thread-safe, and the data reader issues
range reads from a thread pool.

Reads retry transient failures (429, 5xx, dropped connections) with exponential backoff through
the client's own `google.api_core.retry.Retry`; a missing object raises `NotFound` at once.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

GS = "gs://"
_local = threading.local()


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """Backoff for transient errors: initial delay, growth, cap, and total deadline (seconds)."""

  initial: float = 0.1
  multiplier: float = 2.0
  maximum: float = 10.0
  deadline: float = 300.0


DEFAULT_RETRY = RetryPolicy()


def is_gcs(path: str) -> bool:
  return str(path).startswith(GS)


def split(path: str) -> tuple[str, str]:
  """(bucket, object name) of gs://BUCKET/NAME."""
  bucket, _, name = str(path)[len(GS):].partition("/")
  if not is_gcs(path) or not bucket:
    raise ValueError(f"{path!r} is not gs://BUCKET/OBJECT")
  return bucket, name


def modules() -> tuple[Any, Any]:
  """(google.cloud.storage, google.api_core.exceptions), with an install hint if missing."""
  try:
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError("gs:// paths need google-cloud-storage: pip install "
                       "google-cloud-storage") from e
  return storage, exceptions


def client():
  """This thread's client for the current endpoint (`STORAGE_EMULATOR_HOST` or Google's)."""
  storage, _ = modules()
  key = os.environ.get("STORAGE_EMULATOR_HOST", "")
  clients = getattr(_local, "clients", None)
  if clients is None:
    clients = _local.clients = {}
  if key not in clients:
    clients[key] = storage.Client()
  return clients[key]


def blob(path: str):
  """The client's Blob for gs://BUCKET/OBJECT (no request is made)."""
  bucket, name = split(path)
  if not name:
    raise ValueError(f"{path!r} is not gs://BUCKET/OBJECT")
  return client().bucket(bucket).blob(name)


def retry(policy: RetryPolicy = DEFAULT_RETRY):
  """The client's Retry object for transient errors (429, 500, 502, 503, 504, connection)."""
  from google.cloud.storage import retry as storage_retry  # pylint: disable=g-import-not-at-top

  return storage_retry.DEFAULT_RETRY.with_delay(
      initial=policy.initial, maximum=policy.maximum,
      multiplier=policy.multiplier).with_timeout(policy.deadline)


def read_range(path: str, start: int, length: int, policy: RetryPolicy = DEFAULT_RETRY) -> bytes:
  """Bytes [start, start + length) of an object; raises NotFound if it does not exist."""
  if length <= 0:
    return b""
  data = blob(path).download_as_bytes(start=start, end=start + length - 1, checksum=None,
                                      retry=retry(policy))
  if len(data) != length:
    raise EOFError(f"{path}: asked for bytes [{start}, {start + length}), got {len(data)}; "
                   "the object is shorter than its manifest says.")
  return data


def read_bytes(path: str, policy: RetryPolicy = DEFAULT_RETRY) -> bytes | None:
  """A whole object, or None if it does not exist."""
  _, exceptions = modules()
  try:
    return blob(path).download_as_bytes(retry=retry(policy))
  except exceptions.NotFound:
    return None


def exists(path: str) -> bool:
  """True if `path` is an object, or a "directory" (a prefix some object's name starts with)."""
  bucket, name = split(path.rstrip("/") + "/")
  if name.rstrip("/") and blob(path.rstrip("/")).exists(retry=retry()):
    return True
  c = client()
  return any(True for _ in c.list_blobs(c.bucket(bucket), prefix=name, max_results=1,
                                        retry=retry()))


def write_bytes(path: str, data: bytes, content_type: str = "application/octet-stream") -> None:
  """Writes an object (a GCS object write is atomic: readers see the old or the new one)."""
  blob(path).upload_from_string(data, content_type=content_type, retry=retry())


def upload_file(local_path: str, path: str) -> None:
  """Uploads a local file as one object (resumable for large files, atomic when it completes)."""
  blob(path).upload_from_filename(local_path, content_type="application/octet-stream",
                                  retry=retry())


def list_sizes(prefix: str) -> dict[str, int]:
  """gs:// path -> size of every object whose name starts with `prefix` (gs://BUCKET/PREFIX)."""
  bucket, name = split(prefix)
  c = client()
  return {f"{GS}{bucket}/{b.name}": int(b.size)
          for b in c.list_blobs(c.bucket(bucket), prefix=name, retry=retry())}


def list_objects(prefix: str) -> dict[str, tuple[int, int]]:
  """gs:// path -> (size, generation) of every object whose name starts with `prefix`."""
  bucket, name = split(prefix)
  c = client()
  return {f"{GS}{bucket}/{b.name}": (int(b.size), int(b.generation))
          for b in c.list_blobs(c.bucket(bucket), prefix=name, retry=retry())}


def list_dir(path: str) -> list[str]:
  """Names directly under a gs:// "directory" (objects and sub-prefixes), sorted."""
  bucket, name = split(path.rstrip("/") + "/")
  c = client()
  pages = c.list_blobs(c.bucket(bucket), prefix=name, delimiter="/", retry=retry())
  names = [b.name[len(name):] for b in pages]
  names += [p[len(name):].rstrip("/") for p in pages.prefixes]
  return sorted(n for n in names if n)


def delete(path: str) -> None:
  blob(path).delete(retry=retry())


def open_read(path: str):
  """A seekable binary file over an object (range reads on demand; pyarrow reads Parquet so)."""
  return blob(path).open("rb", retry=retry())
