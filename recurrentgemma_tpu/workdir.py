"""The training workdir: its layout, and the few file operations the trainer does in it.

A workdir is a local directory or a remote URL (anything with "://", e.g. `gs://bucket/run` on a TPU
pod). Local paths use `os` exactly as before (absolute paths, tmp + rename for atomic writes);
gs:// goes through gcs.py's google-cloud-storage client (the one the data reader and the sweep's
compare-and-swap records use, so a reader sees what any of them wrote), other URLs through
`etils.epath`; remote paths are never made absolute, and get atomic writes from the store itself
(one object write replaces the object whole). Orbax (checkpoints/) and `open_append` (metrics.jsonl,
the TensorBoard event files of events.py) take gs:// paths on their own (TensorFlow's `tf.io.gfile`).
This module is the one file layer for run directories and sweep roots alike; launch/sweep/store.py
adds only the compare-and-swap writes.

Layout (`<workdir>/...`): checkpoints/ (and checkpoints_corrupt/ for quarantined steps,
checkpoints_rolled_back/ for steps abandoned by a loss-spike rollback), spikes.json (the rollbacks),
config.json, metrics.jsonl, goodput.jsonl, tensorboard/, heartbeat/process_<i>.json,
logs/process_<i>.log, profile/ once a profile is requested (profiling.py), and launch/ when a
launcher runs the job. launch/ reads and writes workdirs only through this module
(and heartbeat.py), so the two never disagree on a path or on what makes a run complete.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from typing import IO, Any

from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import gcs

CHECKPOINT_DIR = "checkpoints"
PARAMS_ITEM = "params"  # a checkpoint step's parameters item (checkpoints/manager.py)
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
HEARTBEAT_DIR = "heartbeat"
LOGS_DIR = "logs"
LAUNCH_DIR = "launch"  # the launcher's own records (launch/state.py): spec, state, STOP, exits
LAUNCH_STATE_FILE = "state.json"  # launch/<this>: phase, attempts and the event history
GOODPUT_FILE = "goodput.jsonl"  # process 0's timing records (goodput.py)
PROFILE_DIR = "profile"  # on-demand profiles: the request, each capture's trace and digest (profiling.py)
SPIKES_FILE = "spikes.json"  # loss-spike rollbacks and the data steps they skip (spikes.py)
EXECUTABLE_FILE = "executable/train_step.bin"  # the train step compiled by the fit check (executable.py)
COMPILATION_CACHE_DIR = "compilation_cache"  # the run's JAX persistent compilation cache


def records(metrics_text: str | None) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl text, in file order (a torn last line, no newline, is dropped)."""
  out = []
  for line in (metrics_text or "").split("\n")[:-1]:
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      pass  # a line torn by a hard kill in the middle of the file
  return out


def final_evaluation(metrics_text: str | None, steps: int) -> dict[str, Any] | None:
  """The one "run complete" rule, on the text of metrics.jsonl: the record of the final evaluation
  at `steps` (train.steps) or later, or None. The trainer writes it only after the last step is
  checkpointed."""
  return next((r for r in records(metrics_text)
               if r.get("split") == "eval" and int(r.get("step", -1)) >= steps), None)


def is_complete(metrics_text: str | None, steps: int) -> bool:
  return final_evaluation(metrics_text, steps) is not None


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of a workdir whose checkpoint holds parameters, oldest first (export, evaluate and
  sample read these; resume judges whole steps itself)."""
  directory = join(workdir, CHECKPOINT_DIR)
  if not isdir(directory):
    return []
  return sorted(int(d) for d in listdir(directory)
                if d.isdigit() and isdir(join(directory, d, PARAMS_ITEM)))


def is_remote(path: str | os.PathLike[str]) -> bool:
  return "://" in os.fspath(path)


def _epath(path: str | os.PathLike[str]):
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(os.fspath(path))


def join(workdir: str | os.PathLike[str], *parts: str) -> str:
  """`workdir/part/...` as a string (no `os.path` on URLs: `gs://b` stays `gs://b`)."""
  workdir = os.fspath(workdir)
  if is_remote(workdir):
    return "/".join([workdir.rstrip("/"), *parts])
  return os.path.join(workdir, *parts)


def parent(path: str) -> str:
  return path.rstrip("/").rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(path)


def resolve(workdir: str | os.PathLike[str]) -> str:
  """The absolute form of a local workdir; a URL unchanged (less a trailing slash)."""
  workdir = os.fspath(workdir)
  return workdir.rstrip("/") if is_remote(workdir) else os.path.abspath(workdir)


def exists(path: str) -> bool:
  if gcs.is_gcs(path):
    return gcs.exists(path)
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  if gcs.is_gcs(path):  # a "directory" is a prefix of some object's name
    return bool(gcs.list_dir(path))
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  if gcs.is_gcs(path):
    return  # a bucket has no directories
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """Names in directory `path`, sorted ([] if it is missing); never a local write's tmp file."""
  if gcs.is_gcs(path):
    return gcs.list_dir(path)
  if not isdir(path):
    return []
  if is_remote(path):
    return sorted(p.name for p in _epath(path).iterdir())
  return sorted(n for n in os.listdir(path) if not _is_tmp(n))


def read_text(path: str) -> str:
  """The file's text; FileNotFoundError if it does not exist."""
  if gcs.is_gcs(path):
    data = gcs.read_bytes(path)
    if data is None:
      raise FileNotFoundError(path)
    return data.decode()
  if is_remote(path):
    return _epath(path).read_text()
  with open(path) as f:
    return f.read()


def read_text_if_exists(path: str) -> str | None:
  """The file's text, or None if it does not exist."""
  try:
    return read_text(path) if gcs.is_gcs(path) or exists(path) else None
  except FileNotFoundError:
    return None  # removed between the two calls (or, on gs://, never there)


def read_json(path: str) -> Any | None:
  """The JSON in `path`, or None if it does not exist (or is not complete JSON)."""
  text = read_text_if_exists(path)
  try:
    return None if text is None else json.loads(text)
  except json.JSONDecodeError:
    return None


def remove(path: str) -> None:
  """Deletes a file if it exists."""
  if gcs.is_gcs(path):
    if exists(path):
      gcs.delete(path)
  elif is_remote(path):
    p = _epath(path)
    if p.exists():
      p.unlink()
  elif os.path.exists(path):
    os.remove(path)


# Suffix of a local write's temporary file (renamed over the file when complete).
TMP_SUFFIX = ".tmp"


def _is_tmp(name: str) -> bool:
  return name.endswith(TMP_SUFFIX) or f"{TMP_SUFFIX}." in name


def write_json(path: str, value: Any) -> None:
  """Replaces `path` with `value` as JSON, atomically (see write_text)."""
  write_text(path, json.dumps(value, indent=1, sort_keys=True),
             tmp_suffix=f"{TMP_SUFFIX}.{os.getpid()}.{threading.get_ident()}")


def write_text(path: str, text: str, *, tmp_suffix: str = TMP_SUFFIX) -> None:
  """Replaces the file at `path` atomically: local tmp file + rename, or one object write."""
  if gcs.is_gcs(path):
    gcs.write_bytes(path, text.encode(), content_type="text/plain")
    return
  if is_remote(path):
    _epath(path).write_text(text)
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + tmp_suffix
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_bytes(path: str, data: bytes) -> None:
  """Replaces the file at `path` atomically, as `write_text` does."""
  if is_remote(path):
    _epath(path).write_bytes(data)
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    return _epath(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def open_append(path: str, binary: bool = False) -> IO[Any]:
  """A file open for appending: text (line-buffered locally) or `binary` (unbuffered locally: each
  write is one system call). A remote one is uploaded on flush."""
  mode = "ab" if binary else "a"
  if is_remote(path):
    # epath's open is a context manager; this is the file object it wraps for gs:// (TensorFlow).
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.io.gfile.GFile(path, mode)
  return open(path, mode, buffering=0 if binary else 1)


def copy(src: str, dst: str) -> None:
  """Copies a file to `dst` (local or remote), creating `dst`'s directory."""
  makedirs(parent(dst))
  if not is_remote(src) and not is_remote(dst):
    shutil.copyfile(src, dst)
    return
  # TensorFlow's file layer on both sides: a local path's own epath backend (os) cannot write a URL.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.io.gfile.copy(os.fspath(src), os.fspath(dst), overwrite=True)


def move(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
  """Moves a file or directory tree; on a store, copies every object then deletes the source."""
  if not is_remote(src) and not is_remote(dst):
    shutil.move(os.fspath(src), os.fspath(dst))
    return
  src, dst = _epath(src), _epath(dst)
  if not src.is_dir():
    src.copy(dst, overwrite=True)
    src.unlink()
    return
  dst.mkdir(parents=True, exist_ok=True)
  for child in src.iterdir():
    move(child, dst / child.name)
  src.rmtree()


def prepare(workdir: str | os.PathLike[str]) -> str:
  """Creates `workdir` if needed and checks it is a writable directory; raises UserError if not.

  Returns the workdir every later path is joined to (absolute if local).
  """
  workdir = resolve(workdir)
  if exists(workdir) and not isdir(workdir):
    raise exit_codes.UserError(f"--workdir={workdir} is a file; give a directory (created if missing).")
  probe = join(workdir, f".write_test.{os.getpid()}")
  try:
    makedirs(workdir)
    if is_remote(workdir):
      p = _epath(probe)
      p.write_text("ok")
      p.unlink()
    else:
      with open(probe, "w") as f:
        f.write("ok")
      os.remove(probe)
  except OSError as e:
    raise exit_codes.UserError(
        f"--workdir={workdir} is not a writable directory ({e.strerror or e}); give one this "
        "process can create files in.") from e
  except Exception as e:  # pylint: disable=broad-except
    # A store's own errors (tf.errors.PermissionDeniedError, a bucket that does not exist, ...).
    if not is_remote(workdir):
      raise
    raise exit_codes.UserError(
        f"--workdir={workdir} is not a writable location ({type(e).__name__}: {e}); give a bucket "
        "path this process can write to.") from e
  return workdir
