"""Reading packed rows by index from a store on local disk (memory-mapped) or gs:// (range reads).

A row is one byte range of its shard's rows object, so reading the rows of a step from object
storage is one ranged GET per run of consecutive rows, issued in parallel from a thread pool;
nothing is written to local disk. `Prefetcher` computes the next steps' batches in the
background (the determinism map knows them in advance), holding at most `depth` batches.
Transient errors are retried with backoff by the storage client (gcs.py); a missing or short
object is a `ReadError` that names it.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable

import numpy as np

from recurrentgemma_tpu import exit_codes, gcs


class ReadError(exit_codes.UserError):
  """A store object vanished or shrank while reading (exit 2: retrying will not bring it back)."""


class ShardRows:
  """The rows of one split of one shard: memory-mapped locally, range-read on gs://."""

  def __init__(self, path: str, num_rows: int, dtype: np.dtype, hint: str):
    self.path, self.num_rows, self.dtype, self.hint = path, num_rows, dtype, hint
    self.remote = gcs.is_gcs(path)
    self._memmap = None
    if num_rows and not self.remote:
      self._memmap = np.memmap(path, dtype, "r", shape=(num_rows,))

  def runs(self, index: np.ndarray) -> list[tuple[int, int]]:
    """(first row, count) of each run of consecutive rows in sorted, unique `index`."""
    breaks = np.nonzero(np.diff(index) != 1)[0] + 1
    return [(int(r[0]), len(r)) for r in np.split(index, breaks)]

  def read_run(self, first: int, count: int) -> np.ndarray:
    """Rows [first, first + count) as a structured array."""
    if self._memmap is not None:
      return np.asarray(self._memmap[first:first + count])
    _, exceptions = gcs.modules()
    size = self.dtype.itemsize
    try:
      raw = gcs.read_range(self.path, first * size, count * size)
    except exceptions.NotFound:
      raise ReadError(f"the store object {self.path} is missing (deleted after the job started?); "
                      f"prepare the store again with: {self.hint}") from None
    except EOFError as e:
      raise ReadError(f"{e} Prepare the store again with: {self.hint}") from None
    return np.frombuffer(raw, self.dtype)


class Rows:
  """One split of a source: its shards' rows concatenated by index, read on demand."""

  def __init__(self, parts: list[ShardRows], seq_len: int, threads: int = 16):
    self.parts = parts
    self.seq_len = seq_len
    self.offsets = np.cumsum([0] + [p.num_rows for p in parts]).astype(np.int64)
    self._threads = threads
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._lock = threading.Lock()

  @property
  def num_rows(self) -> int:
    return int(self.offsets[-1])

  def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
    with self._lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads,
                                                           thread_name_prefix="rg-store-read")
      return self._pool

  def gather(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(targets, segment_ids) of rows `index`, int32 [len(index), seq_len] each."""
    index = np.asarray(index, np.int64)
    targets = np.empty((index.size, self.seq_len), np.int32)
    segments = np.empty((index.size, self.seq_len), np.int32)
    if index.size == 0:
      return targets, segments
    if index.min() < 0 or index.max() >= self.num_rows:
      raise IndexError(f"rows {index.min()}..{index.max()} outside [0, {self.num_rows})")
    part = np.searchsorted(self.offsets, index, side="right") - 1
    plan = []  # per part: (rows of `index` in it, where each finds its row among the part's reads)
    jobs = []  # (part, first row, count): one read per run of consecutive rows
    for p in np.unique(part).tolist():
      sel = np.nonzero(part == p)[0]
      local, inverse = np.unique(index[sel] - self.offsets[p], return_inverse=True)
      plan.append((p, sel, inverse))
      jobs += [(p, first, count) for first, count in self.parts[p].runs(local)]
    if len(jobs) > 1 and any(self.parts[p].remote for p, _, _ in jobs):
      results = list(self._executor().map(lambda j: self.parts[j[0]].read_run(j[1], j[2]), jobs))
    else:
      results = [self.parts[p].read_run(first, count) for p, first, count in jobs]
    for p, sel, inverse in plan:
      rows = np.concatenate([r for (q, _, _), r in zip(jobs, results) if q == p])[inverse]
      targets[sel] = rows["targets"]
      segments[sel] = rows["segments"]
    return targets, segments

  @property
  def targets(self) -> np.ndarray:
    """All rows' targets in memory (for tools and tests; training uses `gather`)."""
    return self.gather(np.arange(self.num_rows))[0]

  @property
  def segment_ids(self) -> np.ndarray:
    return self.gather(np.arange(self.num_rows))[1]


class Prefetcher:
  """Computes `fetch(step)` for the `depth` steps after the one asked for, in the background.

  At most `depth` results are held (the memory bound: depth x rows x row bytes). A result is
  identical to calling `fetch` directly, so prefetching changes when data is read, never what.
  `wait_seconds` sums the time `get` spent blocked on data (the data-wait of a training loop).
  """

  def __init__(self, fetch: Callable[[int], dict], depth: int):
    self._fetch = fetch
    self.depth = depth
    self._futures: dict[int, concurrent.futures.Future] = {}
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, min(depth, 4)),
                                                       thread_name_prefix="rg-prefetch")
    self.wait_seconds = 0.0
    self.waits: list[float] = []
    self.first_get: float | None = None  # perf_counter of the first and the latest `get`
    self.last_get: float | None = None

  def get(self, step: int) -> dict:
    start = time.perf_counter()
    self.first_get = start if self.first_get is None else self.first_get
    self.last_get = start
    future = self._futures.pop(step, None)
    for k in [k for k in self._futures if not step < k <= step + self.depth]:
      self._futures.pop(k).cancel()  # a jump (resume, out-of-order access): drop stale work
    for k in range(step + 1, step + self.depth + 1):
      if k not in self._futures:
        self._futures[k] = self._pool.submit(self._fetch, k)
    result = future.result() if future is not None else self._fetch(step)
    waited = time.perf_counter() - start
    self.wait_seconds += waited
    self.waits.append(waited)
    return result

  def close(self) -> None:
    for f in self._futures.values():
      f.cancel()
    self._futures.clear()
    self._pool.shutdown(wait=False, cancel_futures=True)
