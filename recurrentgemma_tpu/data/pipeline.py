"""Deterministic global batches from prepared stores: `make_pipeline(data_config).batch(step)`.

Global row g of the training stream (g = step * B + r for row r of the step's global batch) is a
pure function of (data config, seed, g):
  1. the mixture assigns g to a source i and an index j within that source's stream, by a fixed,
     seeded pattern of period P in which source i holds round(P * rate_i) slots, so
     j = (g // P) * count_i + (rank of g % P among source i's slots), O(1) for any g;
  2. j picks epoch e = j // N_i and position j % N_i, mapped through the permutation of the N_i
     packed rows keyed by (seed, source, e): every epoch sees every row once, in a new order.
A process computes only the rows it owns, so batches do not depend on the number of processes or
devices, and resuming at step k needs no replay. seqio's own Mixture samples with a stateful
tf.data stream, which cannot jump to row g; that is why mixing happens here.

This module addresses rows (numpy only); `device.py` places them on devices as global jax arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from recurrentgemma_tpu.data import permute, reader, store, vocab as vocab_lib
from recurrentgemma_tpu.data.config import MIXTURE_PERIOD, DataConfig


Batch = dict[str, np.ndarray]


def derive_features(targets: np.ndarray, segment_ids: np.ndarray, bos_id: int) -> Batch:
  """The model's features from packed targets, exactly as seqio.LMFeatureConverter(pack=True).

  Args:
    targets: [B, T] next-token targets (0 on padding).
    segment_ids: [B, T] document number within the row, 0 on padding.
    bos_id: first input token of every document.

  Returns:
    `inputs, targets, segment_ids, positions` (int32) and `loss_weights` (float32), [B, T] each.
  """
  targets = targets.astype(np.int32)
  seg = segment_ids.astype(np.int32)
  prev_seg = np.zeros_like(seg)
  prev_seg[:, 1:] = seg[:, :-1]
  first = seg != prev_seg  # a document (or the padding after it) starts here
  inputs = np.empty_like(targets)
  inputs[:, 0] = bos_id
  inputs[:, 1:] = targets[:, :-1]
  inputs = np.where(first, bos_id, inputs).astype(np.int32)
  # positions: distance from the last document start, 0 on padding.
  t = np.broadcast_to(np.arange(seg.shape[1], dtype=np.int32), seg.shape)
  last_start = np.maximum.accumulate(np.where(first, t, 0), axis=1)
  nonpad = seg > 0
  positions = np.where(nonpad, t - last_start, 0).astype(np.int32)
  return {
      "inputs": inputs,
      "targets": targets,
      "segment_ids": seg,
      "positions": positions,
      "loss_weights": nonpad.astype(np.float32),
  }


def _mixture_pattern(rates: list[float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(source of each slot, rank of each slot within its source, slots per source)."""
  if len(rates) == 1:
    return np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones(1, np.int64)
  share = np.asarray(rates, np.float64) / sum(rates) * MIXTURE_PERIOD
  counts = np.floor(share).astype(np.int64)
  # Largest remainder, ties to the lower index, so counts sum to the period.
  for i in np.argsort(-(share - counts), kind="stable")[: MIXTURE_PERIOD - counts.sum()]:
    counts[i] += 1
  pattern = np.repeat(np.arange(len(rates)), counts)
  pattern = pattern[permute.permute(np.arange(MIXTURE_PERIOD), MIXTURE_PERIOD,
                                    permute.derive_key("mixture", seed))]
  rank = np.zeros(MIXTURE_PERIOD, np.int64)
  for i in range(len(rates)):
    slots = pattern == i
    rank[slots] = np.arange(slots.sum())
  return pattern, rank, counts


class Pipeline:
  """Batches for one process. Build with `make_pipeline(data_config)`, which checks the arguments.

  Attributes:
    config: the typed data settings.
    vocab: the tokenizer (`encode`, `decode`, `eos_id`, `bos_id`, `size`).
    process_index, process_count: which rows `batch(step)` returns by default.
    local_batch_size: rows per process per step (global_batch_size // process_count).
  """

  def __init__(self, cfg: DataConfig, vocab: vocab_lib.Vocabulary, stores: list[store.SourceStore],
               process_index: int, process_count: int):
    self.config = cfg
    self.vocab = vocab
    self.stores = stores
    self.process_index = process_index
    self.process_count = process_count
    self.local_batch_size = cfg.global_batch_size // process_count
    # Every source holds at least one slot: data_config_from checks the rates' floor.
    self._pattern, self._rank, self._counts = _mixture_pattern(
        [s.rate for s in cfg.sources], cfg.seed)
    self._train_rows = np.array([st.train.num_rows for st in stores], np.int64)
    # Stores on object storage are read ahead; local ones are memory-mapped (reads take µs).
    remote = any(p.remote for st in stores for p in st.train.parts)
    self._read_ahead = remote and cfg.prefetch_steps > 0
    self.prefetcher: reader.Prefetcher | None = None  # for the block of rows last asked for
    self._prefetch_rows: range | None = None

  @property
  def num_train_rows(self) -> int:
    """Packed training rows over all sources (one epoch of each)."""
    return int(self._train_rows.sum())

  @property
  def num_eval_rows(self) -> int:
    return sum(st.validation.num_rows for st in self.stores)

  def _local_rows(self, rows: slice | None, batch_size: int) -> range:
    if rows is None:
      local = batch_size // self.process_count
      return range(self.process_index * local, (self.process_index + 1) * local)
    r = range(batch_size)[rows]
    if r.step != 1 or len(r) == 0:
      raise ValueError(f"rows={rows} must select a non-empty contiguous range of [0, {batch_size}).")
    return r

  def source_of(self, global_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, store row) of global training rows: the determinism map of the module docstring."""
    g = np.asarray(global_rows, np.int64)
    period, slot = np.divmod(g, len(self._pattern))
    src = self._pattern[slot]
    j = period * self._counts[src] + self._rank[slot]
    n = self._train_rows[src]
    epoch, pos = np.divmod(j, n)
    out = np.empty_like(g)
    for i in np.unique(src):
      for e in np.unique(epoch[src == i]):
        sel = (src == i) & (epoch == e)
        key = permute.derive_key(self.config.seed, self.config.sources[i].name, int(e))
        out[sel] = permute.permute(pos[sel], int(self._train_rows[i]), key)
    return src, out

  def batch(self, step: int, rows: slice | None = None) -> Batch:
    """Rows `rows` (default: this process's block) of the global training batch at `step`.

    Returns:
      dict of numpy arrays [len(rows), seq_len]; see `derive_features`.
    """
    if step < 0:
      raise ValueError(f"step={step} must be >= 0.")
    local = self._local_rows(rows, self.config.global_batch_size)
    if not self._read_ahead:
      return self._read_batch(step, local)
    if self.prefetcher is None or local != self._prefetch_rows:
      self.close()  # another block of rows: what was read ahead is not it
      self.prefetcher = reader.Prefetcher(lambda k: self._read_batch(k, local),
                                          self.config.prefetch_steps)
      self._prefetch_rows = local
    return self.prefetcher.get(step)

  def close(self) -> None:
    """Stops reading ahead (pending reads are dropped)."""
    if self.prefetcher is not None:
      self.prefetcher.close()

  def _read_batch(self, step: int, local: range) -> Batch:
    g = step * self.config.global_batch_size + np.arange(local.start, local.stop, dtype=np.int64)
    src, idx = self.source_of(g)
    t = self.config.seq_len
    targets = np.empty((len(g), t), np.int32)
    segments = np.empty((len(g), t), np.int32)
    for i in np.unique(src):
      sel = np.nonzero(src == i)[0]
      targets[sel], segments[sel] = self.stores[i].train.gather(idx[sel])
    return derive_features(targets, segments, self.vocab.bos_id)

  def eval_batches(self, rows: slice | None = None) -> Iterator[Batch]:
    """This process's rows of each evaluation batch: every source's validation rows in order.

    The last batch is completed with padding rows (all-zero `loss_weights`), so every process
    yields the same number of batches.
    """
    cfg = self.config
    total = self.num_eval_rows
    if total == 0:
      raise ValueError("no validation rows: every source's validation split is empty (raise "
                       "validation_fraction, set eval_pattern, or set the tfds eval_split).")
    num = -(-total // cfg.eval_batch_size)
    if cfg.num_eval_batches:
      num = min(num, cfg.num_eval_batches)
    local = self._local_rows(rows, cfg.eval_batch_size)
    bounds = np.cumsum([0] + [st.validation.num_rows for st in self.stores])
    for b in range(num):
      g = b * cfg.eval_batch_size + np.arange(local.start, local.stop)
      targets = np.zeros((len(g), cfg.seq_len), np.int32)
      segments = np.zeros((len(g), cfg.seq_len), np.int32)
      for i, st in enumerate(self.stores):
        sel = np.nonzero((g >= bounds[i]) & (g < bounds[i + 1]))[0]
        if sel.size:
          targets[sel], segments[sel] = st.validation.gather(g[sel] - bounds[i])
      yield derive_features(targets, segments, self.vocab.bos_id)


def make_pipeline(cfg: DataConfig, *, process_index: int | None = None,
                  process_count: int | None = None) -> Pipeline:
  """Builds the data pipeline of an experiment's data settings, preparing what is not cached yet.

  Args:
    cfg: the typed data settings (`experiment.build(...).data`, or `data_config_from(config)`).
    process_index: this process; default `jax.process_index()`.
    process_count: processes sharing the global batch; default `jax.process_count()`.

  Returns:
    A `Pipeline`. Without `config.data.store`, the first call on a machine trains the embedded
    tokenizer (if used) and writes each source's store under the cache directory; later calls only
    memory-map them. With it, the prepared stores there are opened (never written): local ones
    memory-mapped, gs:// ones read by range.

  Raises:
    store.StoreError: a prepared store is missing, incomplete or made for other settings.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  # Checked before any preparation, which can take minutes.
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  for field in ("global_batch_size", "eval_batch_size"):
    if getattr(cfg, field) % process_count:
      raise ValueError(f"config.data.{field}={getattr(cfg, field)} is not divisible by the "
                       f"process count {process_count}.")
  vocab = vocab_lib.Vocabulary(vocab_lib.tokenizer_path(cfg), cfg.vocab_size)
  stores = []
  for source in cfg.sources:
    stores.append(store.open_source(cfg, source, vocab) if cfg.store
                  else store.prepare(cfg, source, vocab))
    logging.info("data source %s: %s rows", source.name, stores[-1].count("rows"))
  return Pipeline(cfg, vocab, stores, process_index, process_count)
