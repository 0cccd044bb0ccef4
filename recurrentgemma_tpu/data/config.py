"""Typed, validated data settings: the one place `config.data` becomes dataclasses.

Everything downstream (corpus readers, the store, the pipeline) sees only `DataConfig` and
`SourceConfig`, never a ConfigDict, so every field is checked once, here, before any long work.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

SOURCE_KINDS = ("default", "tfds", "files")
FILE_FORMATS = ("text", "lines", "jsonl", "tfrecord", "parquet")
# Beam runners `python -m recurrentgemma_tpu.data.prepare --runner=...` accepts.
BEAM_RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner")
# Mixture pattern period (pipeline.py): rates are honoured exactly over every P consecutive rows,
# quantised to 1/P. Large enough for rates of 0.1%, small enough to build instantly.
MIXTURE_PERIOD = 4096
# Cache location when `config.data.cache_dir` is empty; tests point the env var at a tmp dir.
CACHE_ENV = "RECURRENTGEMMA_TPU_DATA_CACHE"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "recurrentgemma_tpu", "data")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One pretraining source; several of them with rates form a mixture."""

  name: str
  kind: str  # one of SOURCE_KINDS
  rate: float  # relative mixing rate; only the ratios between sources matter
  # kind="default": directory whose *.py files form the corpus; "" = this interpreter's stdlib.
  default_root: str
  # kind="tfds"
  tfds_name: str
  tfds_data_dir: str
  train_split: str
  eval_split: str
  # kind="files"
  pattern: str  # comma-separated globs (any tf.io.gfile filesystem)
  eval_pattern: str  # "" = hold out `validation_fraction` of the documents instead
  format: str  # one of FILE_FORMATS
  # kind="tfds"/"files" (jsonl, tfrecord): name of the text field.
  text_key: str
  # kind="default"/"files" without eval_pattern: fraction of documents held out, by hash of
  # the document's identity, so train and validation never share a document.
  validation_fraction: float
  # Caps the documents read per split (0 = all); lets a huge corpus be prepared in part.
  max_documents: int
  # Independent stores the source is prepared in (by seqio ShardInfo); processes of a machine
  # prepare different shards in parallel. Part of the data definition: changing it changes rows.
  num_shards: int


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything that determines the token stream, plus where to cache it."""

  sources: tuple[SourceConfig, ...]
  seq_len: int  # T: tokens per packed row
  global_batch_size: int  # B: rows per step, summed over all processes
  eval_batch_size: int
  num_eval_batches: int  # 0 = the whole validation split
  seed: int
  vocab_size: int  # from config.model.vocab_size
  tokenizer: str  # SentencePiece model path; "" = train one on the embedded default corpus
  cache_dir: str  # local directory for the tokenizer and the prepared stores
  # Root of stores prepared ahead (`python -m recurrentgemma_tpu.data.prepare --store=...`), a
  # local directory or gs://; "" = `<cache_dir>/stores`, prepared at train start when missing.
  store: str
  prefetch_steps: int  # batches read ahead in the background from a gs:// store
  read_threads: int  # parallel range reads per process from a gs:// store

  @property
  def resolved_cache_dir(self) -> str:
    path = self.cache_dir or os.environ.get(CACHE_ENV, "") or DEFAULT_CACHE_DIR
    return os.path.abspath(os.path.expanduser(path))


def _require(cond: bool, message: str) -> None:
  if not cond:
    raise ValueError(message)


def _source_from_dict(name: str, d: Mapping[str, Any]) -> SourceConfig:
  fields = {f.name for f in dataclasses.fields(SourceConfig)} - {"name"}
  missing = sorted(fields - set(d))
  unknown = sorted(set(d) - fields)
  _require(not missing, f"config.data.sources.{name} lacks fields {missing}; declare them with "
           "configs.base.data_source().")
  _require(not unknown, f"config.data.sources.{name} has unknown fields {unknown}; valid fields: "
           f"{sorted(fields)}.")
  s = SourceConfig(name=name, **{k: d[k] for k in fields})
  where = f"config.data.sources.{name}"
  _require(s.kind in SOURCE_KINDS, f"{where}.kind={s.kind!r}; valid kinds: {SOURCE_KINDS}.")
  _require(s.rate > 0, f"{where}.rate={s.rate!r}; it must be > 0 (remove the source instead).")
  _require(0.0 <= s.validation_fraction < 1.0,
           f"{where}.validation_fraction={s.validation_fraction!r}; it must be in [0, 1).")
  _require(s.max_documents >= 0, f"{where}.max_documents={s.max_documents!r}; it must be >= 0.")
  _require(1 <= s.num_shards <= 100_000,
           f"{where}.num_shards={s.num_shards!r}; it must be in [1, 100000].")
  if s.kind == "tfds":
    _require(bool(s.tfds_name), f"{where}.tfds_name is empty; give a versioned builder such as "
             "'lm1b:1.1.0' or 'c4/en:3.0.1'.")
    # seqio insists on a pinned version, and so do we: the store key relies on it.
    _require(":" in s.tfds_name, f"{where}.tfds_name={s.tfds_name!r} has no version; pin one, "
             "e.g. 'lm1b:1.1.0' or 'c4/en:3.0.1'.")
    _require(bool(s.train_split), f"{where}.train_split is empty.")
    _require(bool(s.text_key), f"{where}.text_key is empty; name the text feature, e.g. 'text'.")
  if s.kind == "files":
    _require(bool(s.pattern.strip(",")), f"{where}.pattern is empty; give one or more globs.")
    _require(s.format in FILE_FORMATS, f"{where}.format={s.format!r}; valid formats: "
             f"{FILE_FORMATS}.")
    if s.format in ("jsonl", "tfrecord", "parquet"):
      _require(bool(s.text_key), f"{where}.text_key is empty; format {s.format!r} needs the name "
               "of the text field.")
  return s


def data_config_from(config: Any) -> DataConfig:
  """Builds the typed data settings from a full experiment config (`config.data`, `config.model`).

  Raises:
    ValueError: naming the bad field and what would be valid.
  """
  d = config.data
  _require("vocab_size" in config.model, "config.model.vocab_size is not set; it is the single "
           "source of the vocabulary size for both the model and the tokenizer.")
  vocab_size = int(config.model.vocab_size)
  _require(vocab_size >= 16, f"config.model.vocab_size={vocab_size}; the data pipeline needs at "
           "least 16 (special ids plus some pieces).")
  seq_len = int(d.seq_len)
  _require(seq_len > 0, f"config.data.seq_len={seq_len}; it must be a positive number of tokens.")
  _require(seq_len < 2**31, f"config.data.seq_len={seq_len} is too large.")
  for field in ("global_batch_size", "eval_batch_size"):
    value = int(d[field])
    _require(value > 0, f"config.data.{field}={value}; it must be positive.")
  _require(int(d.num_eval_batches) >= 0,
           f"config.data.num_eval_batches={d.num_eval_batches}; it must be >= 0 (0 = all).")
  _require(len(d.sources) > 0, "config.data.sources is empty; define at least one source.")
  sources = tuple(_source_from_dict(name, d.sources[name]) for name in sorted(d.sources))
  total = sum(s.rate for s in sources)
  for s in sources:
    _require(len(sources) == 1 or s.rate / total * MIXTURE_PERIOD >= 1,
             f"config.data.sources.{s.name}.rate={s.rate} is below 1/{MIXTURE_PERIOD} of the total "
             f"rate {total}; raise it or remove the source.")
  _require(int(d.prefetch_steps) >= 0,
           f"config.data.prefetch_steps={d.prefetch_steps}; it must be >= 0 (0 = off).")
  _require(int(d.read_threads) >= 1,
           f"config.data.read_threads={d.read_threads}; it must be >= 1.")
  store = str(d.store).strip()
  _require(not store or store.startswith("gs://") or "://" not in store,
           f"config.data.store={store!r}; give a local directory or a gs://BUCKET/PATH URL.")
  if d.tokenizer:
    _require(bool(str(d.tokenizer).strip()), "config.data.tokenizer is blank.")
  return DataConfig(
      sources=sources,
      seq_len=seq_len,
      global_batch_size=int(d.global_batch_size),
      eval_batch_size=int(d.eval_batch_size),
      num_eval_batches=int(d.num_eval_batches),
      seed=int(d.seed),
      vocab_size=vocab_size,
      tokenizer=str(d.tokenizer),
      cache_dir=str(d.cache_dir),
      store=store.rstrip("/"),
      prefetch_steps=int(d.prefetch_steps),
      read_threads=int(d.read_threads),
  )
