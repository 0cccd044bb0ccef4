"""The prepared store: tokenized, packed rows of one source, read by global row index.

A source is prepared in `num_shards` independent shards (seqio ShardInfo over its documents);
shard i lives in `<cache_dir>/stores/<source>-<key>[-shard<i>-of-<S>]/`:
  meta.json                       shapes, dtypes, row and token counts, what the key was made of
  {train,validation}.targets.bin  [rows, seq_len] next-token targets
  {train,validation}.segments.bin [rows, seq_len] document number in the row, 0 = padding
and the source's rows are its shards' rows concatenated in shard order. `inputs`, `positions` and
`loss_weights` follow from targets and segments (pipeline.py derives them exactly as seqio's
LMFeatureConverter does), so the store holds 2 numbers per token instead of 5.

The key hashes everything that decides the rows (source settings and a fingerprint of its data,
tokenizer bytes, seq_len, seed), so a store is never reused for different data. A shard is
written to a temporary directory and renamed into place: readers never see a partial store and
processes that prepare the same shard at once (e.g. every host on a shared disk) are harmless.
Processes of one machine coordinate through file locks: each first takes shards nobody is
building, then waits for the rest, so N local processes prepare N shards at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
import uuid

import numpy as np

from recurrentgemma_tpu.data import corpus, locks
from recurrentgemma_tpu.data.config import DataConfig, SourceConfig
from recurrentgemma_tpu.data.vocab import Vocabulary

FORMAT_VERSION = 1
_WRITE_ROWS = 256  # rows buffered per write


@dataclasses.dataclass(frozen=True)
class Split:
  """Memory-mapped rows of one split ([rows, seq_len] each); nothing is read until indexed."""

  targets: np.ndarray
  segment_ids: np.ndarray

  @property
  def num_rows(self) -> int:
    return self.targets.shape[0]


@dataclasses.dataclass(frozen=True)
class Store:
  """One prepared shard."""

  path: str
  train: Split
  validation: Split
  meta: dict


class Rows:
  """One split of a source: its shards' rows concatenated by index, read on demand."""

  def __init__(self, parts: list[Split]):
    self.parts = parts
    self.offsets = np.cumsum([0] + [p.num_rows for p in parts]).astype(np.int64)
    self.seq_len = parts[0].targets.shape[1]

  @property
  def num_rows(self) -> int:
    return int(self.offsets[-1])

  def gather(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(targets, segment_ids) of rows `index`, int32 [len(index), seq_len] each."""
    index = np.asarray(index, np.int64)
    targets = np.empty((index.size, self.seq_len), np.int32)
    segments = np.empty((index.size, self.seq_len), np.int32)
    part = np.searchsorted(self.offsets, index, side="right") - 1
    for p in np.unique(part):
      sel = np.nonzero(part == p)[0]
      local = index[sel] - self.offsets[p]
      order = np.argsort(local, kind="stable")  # sorted reads are sequential on disk
      sel, local = sel[order], local[order]
      targets[sel] = self.parts[p].targets[local]
      segments[sel] = self.parts[p].segment_ids[local]
    return targets, segments

  @property
  def targets(self) -> np.ndarray:
    """All rows' targets in memory (for tools and tests; training uses `gather`)."""
    return self.gather(np.arange(self.num_rows))[0]

  @property
  def segment_ids(self) -> np.ndarray:
    return self.gather(np.arange(self.num_rows))[1]


@dataclasses.dataclass(frozen=True)
class SourceStore:
  """All shards of one source."""

  key: str
  shards: list[Store]
  train: Rows
  validation: Rows

  @property
  def paths(self) -> list[str]:
    return [s.path for s in self.shards]

  def count(self, what: str) -> dict[str, int]:
    """Summed per-split `rows` or `tokens` (non-padding) of the shards."""
    return {split: sum(s.meta[what][split] for s in self.shards) for split in corpus.SPLITS}


def store_key(cfg: DataConfig, source: SourceConfig, vocab: Vocabulary) -> tuple[str, dict]:
  """Content key of a source's stores and the description it hashes."""
  desc: dict = {
      "format_version": FORMAT_VERSION,
      "source": {k: v for k, v in dataclasses.asdict(source).items() if k not in ("name", "rate")},
      "seq_len": cfg.seq_len,
      "seed": cfg.seed,
      "tokenizer_sha256": vocab.sha256,
  }
  if source.kind == "default":
    desc["data_fingerprint"] = corpus.default_fingerprint(source)
  elif source.kind == "files":
    where = f"config.data.sources.{source.name}"
    files = corpus.expand_globs(source.pattern, f"{where}.pattern")
    if source.eval_pattern:
      files += corpus.expand_globs(source.eval_pattern, f"{where}.eval_pattern")
    desc["data_fingerprint"] = corpus.files_fingerprint(files)
  # TFDS datasets are versioned by their builder name/version, already in the source settings.
  key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
  return key, desc


def shard_path(cfg: DataConfig, source: SourceConfig, key: str, shard: int) -> str:
  name = f"{source.name}-{key[:20]}"
  if source.num_shards > 1:
    name += f"-shard{shard:05d}-of-{source.num_shards:05d}"
  return os.path.join(cfg.resolved_cache_dir, "stores", name)


def _dtype_for(max_value: int) -> np.dtype:
  return np.dtype(np.uint16) if max_value < 2**16 else np.dtype(np.int32)


def _write_split(rows, directory: str, split: str, token_dtype, seg_dtype) -> tuple[int, int]:
  """Writes packed rows; returns (rows, non-padding tokens)."""
  n = tokens = 0
  with open(os.path.join(directory, f"{split}.targets.bin"), "wb") as ft, \
       open(os.path.join(directory, f"{split}.segments.bin"), "wb") as fs:
    tbuf, sbuf = [], []
    for row in itertools.chain(rows, [None]):
      if row is not None:
        tbuf.append(row["targets"])
        sbuf.append(row["segment_ids"])
      if tbuf and (len(tbuf) == _WRITE_ROWS or row is None):
        segs = np.stack(sbuf)
        ft.write(np.stack(tbuf).astype(token_dtype).tobytes())
        fs.write(segs.astype(seg_dtype).tobytes())
        n += len(tbuf)
        tokens += int((segs > 0).sum())
        tbuf, sbuf = [], []
  return n, tokens


def _done(path: str) -> bool:
  return os.path.exists(os.path.join(path, "meta.json"))


def prepare(cfg: DataConfig, source: SourceConfig, vocab: Vocabulary) -> SourceStore:
  """Builds the shards of one source that are not cached yet; returns the opened source."""
  key, desc = store_key(cfg, source, vocab)
  paths = [shard_path(cfg, source, key, i) for i in range(source.num_shards)]
  missing = [i for i, p in enumerate(paths) if not _done(p)]
  # First the shards no other local process is building, then wait for the others' shards.
  for i in missing:
    with locks.try_exclusive(paths[i]) as mine:
      if mine and not _done(paths[i]):
        _build(cfg, source, vocab, key, desc, i, paths[i])
  for i in missing:
    if not _done(paths[i]):
      with locks.exclusive(paths[i]):
        if not _done(paths[i]):
          _build(cfg, source, vocab, key, desc, i, paths[i])
  shards = [open_store(p) for p in paths]
  if sum(s.train.num_rows for s in shards) == 0:
    raise corpus.CorpusError(
        f"config.data.sources.{source.name} ({source.kind}) has no training documents; check "
        f"its pattern / tfds split / validation_fraction ({desc['source']}).")
  return SourceStore(key=key, shards=shards, train=Rows([s.train for s in shards]),
                     validation=Rows([s.validation for s in shards]))


def _build(cfg: DataConfig, source: SourceConfig, vocab: Vocabulary, key: str, desc: dict,
           shard: int, path: str) -> None:
  """Prepares shard `shard` of a source into `path` (atomically)."""
  from recurrentgemma_tpu.data import tasks  # pylint: disable=g-import-not-at-top (TensorFlow)

  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  os.makedirs(tmp)
  # One line before the one-time work, so a first run does not look hung.
  logging.info("preparing data source %s, shard %d/%d (tokenize + pack, once per cache) ...",
               source.name, shard + 1, source.num_shards)
  try:
    errors = tasks.ReaderErrors()
    task = tasks.register_task(source, key, vocab, errors)
    token_dtype = _dtype_for(vocab.size - 1)
    seg_dtype = _dtype_for(cfg.seq_len)
    rows, tokens, start = {}, {}, time.time()
    for split in corpus.SPLITS:
      has_split = not (source.kind == "tfds" and split == corpus.VALIDATION
                       and not source.eval_split)
      examples = (tasks.packed_examples(task, source, split, cfg, vocab, errors, shard)
                  if has_split else iter(()))
      rows[split], tokens[split] = _write_split(examples, tmp, split, token_dtype, seg_dtype)
    meta = {
        "key": key, "description": desc, "shard": [shard, source.num_shards],
        "seq_len": cfg.seq_len, "rows": rows, "tokens": tokens,
        "token_dtype": token_dtype.name, "segment_dtype": seg_dtype.name,
        "prepare_seconds": round(time.time() - start, 2),
    }
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    try:
      os.rename(tmp, path)
    except OSError:
      if not os.path.exists(os.path.join(path, "meta.json")):
        raise
      # Another process finished the same store first; its bytes equal ours.
    logging.info("prepared %s: %s rows in %.1fs", path, rows, meta["prepare_seconds"])
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def open_store(path: str) -> Store:
  """Memory-maps a prepared shard."""
  with open(os.path.join(path, "meta.json")) as f:
    meta = json.load(f)
  t = meta["seq_len"]

  def split(name: str) -> Split:
    n = meta["rows"][name]
    if n == 0:
      empty = np.zeros((0, t), np.int32)
      return Split(empty, empty)
    return Split(
        np.memmap(os.path.join(path, f"{name}.targets.bin"), meta["token_dtype"], "r", shape=(n, t)),
        np.memmap(os.path.join(path, f"{name}.segments.bin"), meta["segment_dtype"], "r",
                  shape=(n, t)))

  return Store(path=path, train=split(corpus.TRAIN), validation=split(corpus.VALIDATION),
               meta=meta)
