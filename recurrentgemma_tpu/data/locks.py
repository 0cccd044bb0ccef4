"""One preparer at a time per cache entry, across the processes of a machine.

Every process of a job builds missing tokenizers and stores itself, and the results are
byte-identical, so a lock is only an economy: several local processes (the local multi-process
backend, or tests) would otherwise all do the same minutes of work at once. `flock` locks are
released by the kernel when their holder exits or dies, so a crash cannot leave a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
  """Holds an exclusive lock on `path + ".lock"` (created if missing) for the `with` block."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".lock", "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def try_exclusive(path: str) -> Iterator[bool]:
  """Like `exclusive`, but yields False at once instead of waiting when another holder has it."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".lock", "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
