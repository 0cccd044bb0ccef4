"""The prepared store: tokenized, packed rows of one source, read by global row index.

A source's store is one directory (local or gs://) under the store root,
`<root>/<source>-<key[:20]>/`:
  {train,validation}-<i>-of-<S>.rows   shard i's packed rows; row r is the byte range
                                       [r * row_bytes, (r + 1) * row_bytes): seq_len targets, then
                                       seq_len segment ids (little-endian, uint16 when they fit)
  shard-<i>-of-<S>.json                shard i's rows, tokens, bytes and sha256 per split
  manifest.json                        written LAST: key, what the key hashes, dtypes, every shard
The source's rows are its shards' rows concatenated in shard order. One row is one range read
(targets and segments side by side), so a reader on object storage pays one request per row;
`inputs`, `positions` and `loss_weights` follow from targets and segments (pipeline.py).

`prepare_shard` is THE preparation: one shard of one source, tokenized, cut, shuffled with the data
seed and packed by the seqio Task. The in-process path (`prepare`, used at train start for the
local cache) and the Beam pipeline (beam.py) both call it, so any runner and any number of workers
write byte-identical stores. The key hashes everything that decides the rows (source settings and a
fingerprint of its data, tokenizer bytes, seq_len, seed; not the rate, so re-weighting a mixture
reuses stores). A reader opens a store only through its manifest, and checks every rows object's
size against it, so a half-written, truncated or mismatched store fails at start-up (`StoreError`,
exit 2) with the field that differs and the command that prepares it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence

import numpy as np

from recurrentgemma_tpu import exit_codes, gcs
from recurrentgemma_tpu.data import corpus, locks, reader
from recurrentgemma_tpu.data.config import DataConfig, SourceConfig
from recurrentgemma_tpu.data.vocab import Vocabulary

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
_WRITE_ROWS = 256  # rows buffered per write


class StoreError(exit_codes.UserError):
  """A prepared store is missing, incomplete, truncated or made for other settings (exit 2)."""


# ------------------------------------------------------------------------------- paths and I/O


def join(*parts: str) -> str:
  if gcs.is_gcs(parts[0]):
    return "/".join(str(p).rstrip("/") for p in parts)
  return os.path.join(*parts)


def root(cfg: DataConfig) -> str:
  """The store root: `config.data.store`, or `<cache_dir>/stores` (prepared on first use)."""
  if cfg.store:
    return cfg.store if gcs.is_gcs(cfg.store) else os.path.abspath(os.path.expanduser(cfg.store))
  return os.path.join(cfg.resolved_cache_dir, "stores")


def store_dir(store_root: str, source: SourceConfig, key: str) -> str:
  return join(store_root, f"{source.name}-{key[:20]}")


def rows_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}.rows"


def stats_name(shard: int, num_shards: int) -> str:
  return f"shard-{shard:05d}-of-{num_shards:05d}.json"


def read_text(path: str) -> str | None:
  if gcs.is_gcs(path):
    data = gcs.read_bytes(path)
    return None if data is None else data.decode()
  try:
    with open(path) as f:
      return f.read()
  except FileNotFoundError:
    return None


def _write_text(path: str, text: str) -> None:
  """Replaces `path` atomically (tmp + rename locally; a GCS object write is atomic)."""
  if gcs.is_gcs(path):
    gcs.write_bytes(path, text.encode(), content_type="application/json")
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _sizes(directory: str) -> dict[str, int]:
  """Object/file name -> size of everything in a store directory ({} if there is none)."""
  if gcs.is_gcs(directory):
    prefix = directory.rstrip("/") + "/"
    return {p[len(prefix):]: n for p, n in gcs.list_sizes(prefix).items()}
  if not os.path.isdir(directory):
    return {}
  return {n: os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)
          if ".tmp-" not in n}


def _list_root(store_root: str) -> list[str] | None:
  """Entries of the store root, or None if it does not exist."""
  if gcs.is_gcs(store_root):
    names = gcs.list_dir(store_root)
    return names or None
  if not os.path.isdir(store_root):
    return None
  return sorted(os.listdir(store_root))


# ------------------------------------------------------------------------------- key and dtypes


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


def _dtype_for(max_value: int) -> np.dtype:
  return np.dtype("<u2") if max_value < 2**16 else np.dtype("<i4")


def row_dtype(token_dtype: str, segment_dtype: str, seq_len: int) -> np.dtype:
  """One packed row: seq_len targets, then seq_len segment ids."""
  return np.dtype([("targets", token_dtype, (seq_len,)), ("segments", segment_dtype, (seq_len,))])


def _dtypes(cfg: DataConfig, vocab: Vocabulary) -> tuple[str, str]:
  return _dtype_for(vocab.size - 1).str, _dtype_for(cfg.seq_len).str


# ------------------------------------------------------------------------------- preparation


def _write_rows(rows: Iterable[dict[str, np.ndarray]], path: str, dtype: np.dtype) -> dict:
  """Writes packed rows to `path` (local: tmp + rename; gs://: a local temp file, uploaded)."""
  local = not gcs.is_gcs(path)
  if local:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
  else:
    fd, tmp = tempfile.mkstemp(prefix="rg-store-", suffix=".rows")
  n = tokens = 0
  digest = hashlib.sha256()
  try:
    with os.fdopen(fd, "wb") as f:
      for chunk in iter(lambda: list(itertools.islice(rows, _WRITE_ROWS)), []):
        buf = np.empty(len(chunk), dtype)
        buf["targets"] = np.stack([r["targets"] for r in chunk])
        buf["segments"] = np.stack([r["segment_ids"] for r in chunk])
        raw = buf.tobytes()
        f.write(raw)
        digest.update(raw)
        n += len(chunk)
        tokens += int((buf["segments"] > 0).sum())
    if local:
      os.replace(tmp, path)
    else:
      gcs.upload_file(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return {"rows": n, "tokens": tokens, "bytes": n * dtype.itemsize, "sha256": digest.hexdigest()}


def prepare_shard(cfg: DataConfig, source: SourceConfig, vocab: Vocabulary, key: str,
                  shard: int, directory: str) -> dict:
  """Prepares shard `shard` of `source` into the store `directory`; returns its stats.

  Pure in its output: the bytes written depend only on (cfg, source, vocab, shard), whoever runs
  it (this process at train start, or a Beam worker), so re-running a shard is harmless.
  """
  from recurrentgemma_tpu.data import tasks  # pylint: disable=g-import-not-at-top (TensorFlow)

  logging.info("preparing data source %s, shard %d/%d (tokenize + pack, once per store) ...",
               source.name, shard + 1, source.num_shards)
  errors = tasks.ReaderErrors()
  task = tasks.register_task(source, key, vocab, errors)
  dtype = row_dtype(*_dtypes(cfg, vocab), cfg.seq_len)
  stats: dict = {"shard": shard, "num_shards": source.num_shards}
  start = time.time()
  for split in corpus.SPLITS:
    has_split = not (source.kind == "tfds" and split == corpus.VALIDATION and not source.eval_split)
    examples = (tasks.packed_examples(task, source, split, cfg, vocab, errors, shard)
                if has_split else iter(()))
    stats[split] = _write_rows(examples, join(directory, rows_name(split, shard, source.num_shards)),
                               dtype)
  _write_text(join(directory, stats_name(shard, source.num_shards)),
              json.dumps(stats, indent=1, sort_keys=True))
  logging.info("prepared %s shard %d/%d: %s rows in %.1fs", directory, shard + 1,
               source.num_shards, {split: stats[split]["rows"] for split in corpus.SPLITS},
               time.time() - start)
  return stats


def write_manifest(cfg: DataConfig, source: SourceConfig, vocab: Vocabulary, key: str, desc: dict,
                   directory: str, shard_stats: Sequence[dict]) -> dict:
  """Writes the manifest (the store's commit marker) from every shard's stats; returns it."""
  shard_stats = sorted(shard_stats, key=lambda s: s["shard"])
  if [s["shard"] for s in shard_stats] != list(range(source.num_shards)):
    raise RuntimeError(f"{directory}: shard stats {[s['shard'] for s in shard_stats]} do not cover "
                       f"0..{source.num_shards - 1}")
  token_dtype, segment_dtype = _dtypes(cfg, vocab)
  manifest = {
      "format_version": FORMAT_VERSION, "key": key, "description": desc, "source": source.name,
      "seq_len": cfg.seq_len, "token_dtype": token_dtype, "segment_dtype": segment_dtype,
      "row_bytes": row_dtype(token_dtype, segment_dtype, cfg.seq_len).itemsize,
      "num_shards": source.num_shards,
      "shards": [{split: {**s[split], "object": rows_name(split, s["shard"], source.num_shards)}
                  for split in corpus.SPLITS} for s in shard_stats],
  }
  for split in corpus.SPLITS:
    manifest[split] = {"rows": sum(s[split]["rows"] for s in shard_stats),
                       "tokens": sum(s[split]["tokens"] for s in shard_stats)}
  if manifest[corpus.TRAIN]["rows"] == 0:
    raise corpus.CorpusError(
        f"config.data.sources.{source.name} ({source.kind}) has no training documents; check "
        f"its pattern / tfds split / validation_fraction ({desc['source']}).")
  _write_text(join(directory, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
  return manifest


def read_shard_stats(directory: str, num_shards: int) -> list[dict | None]:
  out = []
  for i in range(num_shards):
    text = read_text(join(directory, stats_name(i, num_shards)))
    out.append(None if text is None else json.loads(text))
  return out


def prepare(cfg: DataConfig, source: SourceConfig, vocab: Vocabulary,
            store_root: str | None = None) -> SourceStore:
  """Prepares the shards of one source that are missing, in this process; returns it opened.

  Local processes preparing the same local store coordinate through file locks: each first takes
  shards nobody is building, then waits for the others' shards, so N processes build N at a time.
  """
  store_root = store_root or root(cfg)
  key, desc = store_key(cfg, source, vocab)
  directory = store_dir(store_root, source, key)
  if read_text(join(directory, MANIFEST)) is None:
    if gcs.is_gcs(directory):
      for i, stats in enumerate(read_shard_stats(directory, source.num_shards)):
        if stats is None:
          prepare_shard(cfg, source, vocab, key, i, directory)
    else:
      _prepare_local(cfg, source, vocab, key, directory)
    stats = read_shard_stats(directory, source.num_shards)
    write_manifest(cfg, source, vocab, key, desc, directory, stats)
  return open_source(cfg, source, vocab, store_root)


def _prepare_local(cfg: DataConfig, source: SourceConfig, vocab: Vocabulary, key: str,
                   directory: str) -> None:
  lock_dir = directory + ".locks"

  def done(i: int) -> bool:
    return os.path.exists(os.path.join(directory, stats_name(i, source.num_shards)))

  missing = [i for i in range(source.num_shards) if not done(i)]
  for i in missing:
    with locks.try_exclusive(os.path.join(lock_dir, str(i))) as mine:
      if mine and not done(i):
        prepare_shard(cfg, source, vocab, key, i, directory)
  for i in missing:
    if not done(i):
      with locks.exclusive(os.path.join(lock_dir, str(i))):
        if not done(i):
          prepare_shard(cfg, source, vocab, key, i, directory)


# ------------------------------------------------------------------------------- opening, checks


@dataclasses.dataclass(frozen=True)
class SourceStore:
  """One source's opened store."""

  key: str
  directory: str
  manifest: dict
  train: reader.Rows
  validation: reader.Rows

  def count(self, what: str) -> dict[str, int]:
    """Per-split `rows` or `tokens` (non-padding)."""
    return {split: self.manifest[split][what] for split in corpus.SPLITS}


def prepare_command(store_root: str, config_args: Sequence[str] | None = None) -> str:
  """The command that prepares this job's stores (its own --config flags, or a placeholder)."""
  if config_args is None:
    config_args = [a for a in sys.argv[1:] if a.startswith("--config")]
  args = " ".join(shlex.quote(a) for a in config_args) or "--config=YOUR_CONFIG"
  return f"python -m recurrentgemma_tpu.data.prepare {args} --store={store_root}"


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
  out: dict[str, object] = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _differences(want: dict, have: dict) -> list[str]:
  def show(v):
    s = repr(v)
    return s if len(s) <= 24 else s[:13] + "...'"

  a, b = _flatten(want), _flatten(have)
  return [f"{k}: store {show(b.get(k))}, config {show(a.get(k))}"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _mismatch(store_root: str, source: SourceConfig, desc: dict, hint: str) -> StoreError:
  """The error for a root that has no store with this key: the nearest store's differing fields."""
  names = _list_root(store_root)
  if names is None:
    return StoreError(f"config.data.store={store_root!r} does not exist (no prepared store); "
                      f"prepare it with: {hint}")
  best = None
  for name in names:
    if not name.startswith(f"{source.name}-") or name.endswith(".locks"):
      continue
    text = read_text(join(store_root, name, MANIFEST))
    if text is None:
      continue
    diff = _differences(desc, json.loads(text)["description"])
    if best is None or len(diff) < len(best[1]):
      best = (name, diff)
  if best is None:
    return StoreError(f"config.data.store={store_root!r} has no prepared store of source "
                      f"{source.name!r}; prepare it with: {hint}")
  return StoreError(f"the store {join(store_root, best[0])} of source {source.name!r} was "
                    f"prepared with other settings ({'; '.join(best[1])}); prepare this config's "
                    f"store with: {hint}")


def open_source(cfg: DataConfig, source: SourceConfig, vocab: Vocabulary,
                store_root: str | None = None,
                config_args: Sequence[str] | None = None) -> SourceStore:
  """Opens one source's prepared store, checking it against the config and its manifest.

  Raises:
    StoreError: naming the store, the differing key field or the bad object, and the command
      that prepares the store.
  """
  store_root = store_root or root(cfg)
  hint = prepare_command(store_root, config_args)
  key, desc = store_key(cfg, source, vocab)
  directory = store_dir(store_root, source, key)
  sizes = _sizes(directory)
  if not sizes:
    raise _mismatch(store_root, source, desc, hint)
  text = read_text(join(directory, MANIFEST))
  if text is None:
    raise StoreError(f"the store {directory} has no {MANIFEST} (its preparation did not finish); "
                     f"prepare it with: {hint}")
  manifest = json.loads(text)
  if manifest.get("key") != key:
    raise StoreError(f"the store {directory} was prepared with other settings "
                     f"({'; '.join(_differences(desc, manifest.get('description', {})))}); "
                     f"prepare it again with: {hint}")
  dtype = row_dtype(manifest["token_dtype"], manifest["segment_dtype"], manifest["seq_len"])
  splits = {}
  for split in corpus.SPLITS:
    parts = []
    for shard in manifest["shards"]:
      entry = shard[split]
      size = sizes.get(entry["object"])
      path = join(directory, entry["object"])
      if size is None:
        raise StoreError(f"the store object {path} is missing; prepare the store again with: {hint}")
      if size != entry["bytes"]:
        raise StoreError(f"the store object {path} is {size} bytes but its manifest says "
                         f"{entry['bytes']} (truncated or replaced); prepare the store again "
                         f"with: {hint}")
      parts.append(reader.ShardRows(path, entry["rows"], dtype, hint))
    splits[split] = reader.Rows(parts, cfg.seq_len, threads=cfg.read_threads)
  return SourceStore(key=key, directory=directory, manifest=manifest, train=splits[corpus.TRAIN],
                     validation=splits[corpus.VALIDATION])


def identity(cfg: DataConfig) -> str:
  """What decides a config's stores and where they are: equal for configs sharing them."""
  sources = [{k: v for k, v in dataclasses.asdict(s).items() if k != "rate"} for s in cfg.sources]
  return json.dumps({"sources": sources, "seq_len": cfg.seq_len, "seed": cfg.seed,
                     "tokenizer": cfg.tokenizer, "vocab_size": cfg.vocab_size,
                     "root": root(cfg)}, sort_keys=True)


def prepare_all(cfg: DataConfig) -> list[str]:
  """Prepares (in this process) every store of `cfg` that is missing; returns their directories."""
  from recurrentgemma_tpu.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top

  vocab = Vocabulary(vocab_lib.tokenizer_path(cfg), cfg.vocab_size)
  return [prepare(cfg, s, vocab).directory for s in cfg.sources]


def check(cfg: DataConfig, config_args: Sequence[str] | None = None) -> list[str]:
  """Checks a prepared store root (`config.data.store`) against the config: jax-free, no writes
  besides the embedded tokenizer's cache; returns the source stores' directories.

  With no `config.data.store` the stores are prepared in the local cache at train start, and there
  is nothing to check.

  Raises:
    StoreError: the store is missing, incomplete, truncated or prepared for other settings.
  """
  if not cfg.store:
    return []
  from recurrentgemma_tpu.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top

  vocab = Vocabulary(vocab_lib.tokenizer_path(cfg), cfg.vocab_size)
  return [open_source(cfg, s, vocab, config_args=config_args).directory for s in cfg.sources]
