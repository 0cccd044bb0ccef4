"""The prepared store: tokenized, packed rows of one source, read by global row index.

Layout of `<cache_dir>/stores/<source>-<key>/`:
  meta.json                       shapes, dtypes, and what the key was made of
  {train,validation}.targets.bin  [rows, seq_len] next-token targets
  {train,validation}.segments.bin [rows, seq_len] document number in the row, 0 = padding
`inputs`, `positions` and `loss_weights` follow from these two (pipeline.py derives them exactly as
seqio's LMFeatureConverter does), so the store holds 2 numbers per token instead of 5.

The key hashes everything that decides the rows (source settings and a fingerprint of its data,
tokenizer bytes, seq_len, seed), so a store is never reused for different data. A store is
written to a temporary directory and renamed into place: readers never see a partial store and
processes that prepare the same store at once (e.g. every host on a shared disk) are harmless;
processes of one machine also take turns through a file lock, so only the first does the work.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
  path: str
  train: Split
  validation: Split
  meta: dict


def store_key(cfg: DataConfig, source: SourceConfig, vocab: Vocabulary) -> tuple[str, dict]:
  """Content key of a source's store and the description it hashes."""
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


def store_path(cfg: DataConfig, source: SourceConfig, key: str) -> str:
  return os.path.join(cfg.resolved_cache_dir, "stores", f"{source.name}-{key[:20]}")


def _dtype_for(max_value: int) -> np.dtype:
  return np.dtype(np.uint16) if max_value < 2**16 else np.dtype(np.int32)


def _write_split(rows, directory: str, split: str, seq_len: int, token_dtype, seg_dtype) -> int:
  n = 0
  with open(os.path.join(directory, f"{split}.targets.bin"), "wb") as ft, \
       open(os.path.join(directory, f"{split}.segments.bin"), "wb") as fs:
    tbuf, sbuf = [], []
    for row in rows:
      tbuf.append(row["targets"])
      sbuf.append(row["segment_ids"])
      if len(tbuf) == _WRITE_ROWS:
        ft.write(np.stack(tbuf).astype(token_dtype).tobytes())
        fs.write(np.stack(sbuf).astype(seg_dtype).tobytes())
        n += len(tbuf)
        tbuf, sbuf = [], []
    if tbuf:
      ft.write(np.stack(tbuf).astype(token_dtype).tobytes())
      fs.write(np.stack(sbuf).astype(seg_dtype).tobytes())
      n += len(tbuf)
  return n


def prepare(cfg: DataConfig, source: SourceConfig, vocab: Vocabulary) -> str:
  """Builds the store of one source unless it is already cached; returns its directory."""
  key, desc = store_key(cfg, source, vocab)
  path = store_path(cfg, source, key)
  if not os.path.exists(os.path.join(path, "meta.json")):
    with locks.exclusive(path):
      if not os.path.exists(os.path.join(path, "meta.json")):  # not built meanwhile
        _build(cfg, source, vocab, key, desc, path)
  return path


def _build(cfg: DataConfig, source: SourceConfig, vocab: Vocabulary, key: str, desc: dict,
           path: str) -> None:
  from recurrentgemma_tpu.data import tasks  # pylint: disable=g-import-not-at-top (TensorFlow)

  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  os.makedirs(tmp)
  try:
    errors = tasks.ReaderErrors()
    task = tasks.register_task(source, key, vocab, errors)
    token_dtype = _dtype_for(vocab.size - 1)
    seg_dtype = _dtype_for(cfg.seq_len)
    counts, start = {}, time.time()
    for split in corpus.SPLITS:
      has_split = not (source.kind == "tfds" and split == corpus.VALIDATION
                       and not source.eval_split)
      rows = tasks.packed_examples(task, source, split, cfg, vocab, errors) if has_split else iter(())
      counts[split] = _write_split(rows, tmp, split, cfg.seq_len, token_dtype, seg_dtype)
    if counts[corpus.TRAIN] == 0:
      raise corpus.CorpusError(
          f"config.data.sources.{source.name} ({source.kind}) has no training documents; check "
          f"its pattern / tfds split / validation_fraction ({desc['source']}).")
    meta = {
        "key": key, "description": desc, "seq_len": cfg.seq_len, "rows": counts,
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
    logging.info("prepared %s: %s rows in %.1fs", path, counts, meta["prepare_seconds"])
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def open_store(path: str) -> Store:
  """Memory-maps a prepared store."""
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
