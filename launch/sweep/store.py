"""Files under a sweep root, on local disk or a bucket (gs://), with one atomic primitive.

`create_exclusive` writes a file only if it does not exist yet, atomically: O_CREAT|O_EXCL locally,
a `if_generation_match=0` precondition on GCS (the google-cloud-storage client; etils.epath has no
exclusive create). Everything else goes through etils.epath. Claims (runner.py) are built on it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def is_gcs(path: str) -> bool:
  return str(path).startswith("gs://")


def join(*parts: str) -> str:
  return "/".join(str(p).rstrip("/") for p in parts)


def read_json(path: str) -> Any | None:
  """The JSON in `path`, or None if it does not exist (or is being replaced and is partial)."""
  p = epath.Path(path)
  try:
    return json.loads(p.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def write_json(path: str, value: Any) -> None:
  """Replaces `path` atomically (tmp + rename locally; a GCS object write is atomic)."""
  text = json.dumps(value, indent=1, sort_keys=True)
  if is_gcs(path):
    epath.Path(path).write_text(text)
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def create_exclusive(path: str, value: Any) -> bool:
  """Writes JSON to `path` only if no file is there; True if this call created it."""
  text = json.dumps(value, indent=1, sort_keys=True)
  if is_gcs(path):
    return _gcs_create_exclusive(path, text)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(text)
  return True


def _gcs_create_exclusive(path: str, text: str) -> bool:
  try:
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError("a gs:// sweep root needs google-cloud-storage for atomic claims: "
                       "pip install google-cloud-storage") from e
  bucket, _, name = path[len("gs://"):].partition("/")
  blob = storage.Client().bucket(bucket).blob(name)
  try:
    blob.upload_from_string(text, if_generation_match=0)
  except exceptions.PreconditionFailed:
    return False
  return True


def listdir(path: str) -> list[str]:
  p = epath.Path(path)
  if not p.exists():
    return []
  return sorted(c.name for c in p.iterdir())


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)
