"""Data pipeline: sources, packing, determinism, resume, mixtures, errors (single process).

References: documents tokenized directly with the sentencepiece library (not through seqio/TF),
seqio's own LMFeatureConverter for the packed features, and single-process/single-device batches.
The 2-process jax.distributed check is in test_data_multiprocess.py.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import sysconfig

import jax
import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from configs import base
from recurrentgemma_tpu import data
from recurrentgemma_tpu.data import corpus, permute, vocab as vocab_lib

VOCAB = 512  # >= 256 byte-fallback pieces + specials, trains in about a second
SEQ = 64
# Small stdlib modules (present in every CPython) as the embedded corpus of the tests.
_CORPUS_FILES = ("abc.py", "bisect.py", "colorsys.py", "copyreg.py", "fnmatch.py", "genericpath.py",
                 "glob.py", "heapq.py", "keyword.py", "linecache.py", "nturl2path.py", "opcode.py",
                 "operator.py", "queue.py", "sched.py", "shlex.py", "stat.py", "string.py",
                 "textwrap.py", "this.py", "token.py", "types.py", "uu.py", "weakref.py")


@pytest.fixture(scope="session")
def corpus_root(tmp_path_factory) -> str:
  root = tmp_path_factory.mktemp("corpus")
  stdlib = sysconfig.get_paths()["stdlib"]
  for name in _CORPUS_FILES:
    if os.path.exists(os.path.join(stdlib, name)):
      shutil.copy(os.path.join(stdlib, name), root / name)
  os.makedirs(root / "pkg")
  (root / "pkg" / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))  # skipped: not UTF-8
  (root / "pkg" / "uni.py").write_text("s = 'naïve — ünïcödé ✓'\n\tx = 1\n", encoding="utf-8")
  return str(root)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("data_cache"))


def make_pipeline(config, **kwargs):
  """The pipeline of a full experiment config, as the data tools build it."""
  return data.make_pipeline(data.data_config_from(config), **kwargs)


def make_config(corpus_root: str, cache_dir: str, **data_overrides) -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.vocab_size = VOCAB
  config.data.sources = ml_collections.ConfigDict(
      {"default": base.data_source("default", default_root=corpus_root, validation_fraction=0.15)})
  config.data.seq_len = SEQ
  config.data.global_batch_size = 8
  config.data.eval_batch_size = 8
  config.data.cache_dir = cache_dir
  for k, v in data_overrides.items():
    config.data[k] = v
  return config


@pytest.fixture(scope="session")
def pipeline(corpus_root, cache_dir) -> data.Pipeline:
  return make_pipeline(make_config(corpus_root, cache_dir), process_index=0, process_count=1)


def reference_chunks(docs: list[str], sp: spm.SentencePieceProcessor, seq: int) -> list[tuple]:
  """Each document as tokens + EOS, cut into pieces of at most seq tokens (the pipeline's contract)."""
  out = []
  for text in docs:
    ids = sp.EncodeAsIds(text) + [sp.eos_id()]
    out += [tuple(ids[i:i + seq]) for i in range(0, len(ids), seq)]
  return out


def stored_segments(split) -> list[tuple]:
  """Every packed document piece of a split, recovered from targets and segment_ids alone."""
  out = []
  targets = np.asarray(split.targets, np.int64)
  segs = np.asarray(split.segment_ids, np.int64)
  for row, seg in zip(targets, segs):
    for s in np.unique(seg[seg > 0]):
      idx = np.nonzero(seg == s)[0]
      assert np.all(np.diff(idx) == 1), "a document's tokens must be contiguous in its row"
      out.append(tuple(row[idx].tolist()))
    assert np.all(row[seg == 0] == 0), "padding must be token 0"
  return out


# ---------------------------------------------------------------- vocabulary


def test_embedded_tokenizer_is_deterministic_and_lossless(pipeline, corpus_root, tmp_path):
  cfg = data.data_config_from(make_config(corpus_root, str(tmp_path)))
  again = vocab_lib.tokenizer_path(cfg)  # trained from scratch in a fresh cache
  with open(again, "rb") as f:
    assert f.read() == pipeline.vocab.model_bytes
  assert pipeline.vocab.size == VOCAB
  assert (pipeline.vocab.eos_id, pipeline.vocab.bos_id, pipeline.vocab.pad_id) == (1, 2, 0)
  text = open(os.path.join(corpus_root, "pkg", "uni.py"), encoding="utf-8").read()
  text += "\n\n    indented  twice\r\n" + open(os.path.join(corpus_root, "heapq.py")).read()
  assert pipeline.vocab.decode(pipeline.vocab.encode(text)) == text


# ---------------------------------------------------------------- packing


def test_packing_recovers_every_document(pipeline, corpus_root):
  sp = spm.SentencePieceProcessor(model_proto=pipeline.vocab.model_bytes)
  source = pipeline.config.sources[0]
  for split, rows in ((corpus.TRAIN, pipeline.stores[0].train),
                      (corpus.VALIDATION, pipeline.stores[0].validation)):
    docs = [text for _, text in corpus.read_default(source, split)]
    assert docs, split
    got = collections.Counter(stored_segments(rows))
    want = collections.Counter(reference_chunks(docs, sp, SEQ))
    assert got == want, split
  train_ids = {d for d, _ in corpus.read_default(source, corpus.TRAIN)}
  val_ids = {d for d, _ in corpus.read_default(source, corpus.VALIDATION)}
  assert val_ids and not train_ids & val_ids
  assert "pkg/latin1.py" not in train_ids | val_ids
  # Packing fills rows: all but the tail of the stream are at least half full.
  fill = (np.asarray(pipeline.stores[0].train.segment_ids) > 0).mean(axis=1)
  assert np.median(fill) > 0.9


def test_describe_counts_every_token(pipeline):
  from recurrentgemma_tpu.data import prepare

  sp = spm.SentencePieceProcessor(model_proto=pipeline.vocab.model_bytes)
  summary = prepare.describe(pipeline, show_rows=2)
  for split in (corpus.TRAIN, corpus.VALIDATION):
    docs = [t for _, t in corpus.read_default(pipeline.config.sources[0], split)]
    assert summary["sources"]["default"][split]["tokens"] == sum(
        len(sp.EncodeAsIds(t)) + 1 for t in docs)  # + EOS
  row = pipeline.batch(0)["targets"][1]
  assert summary["step0_rows"][1] == pipeline.vocab.decode(row[row > 0][:200])


def _assert_same_store_bytes(a: str, b: str) -> None:
  """Two store directories hold the same files with the same bytes (manifest included)."""
  assert os.path.basename(a) == os.path.basename(b)
  names = sorted(os.listdir(a))
  assert names == sorted(os.listdir(b)) and "manifest.json" in names
  for name in names:
    with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
      assert fa.read() == fb.read(), (a, name)


def test_store_preparation_is_reproducible(pipeline, corpus_root, tmp_path):
  """Hosts prepare their own copies; they must be byte-identical."""
  config = make_config(corpus_root, str(tmp_path), tokenizer=pipeline.vocab.path)
  again = make_pipeline(config, process_index=0, process_count=1)
  _assert_same_store_bytes(pipeline.stores[0].directory, again.stores[0].directory)


def test_sharded_source_prepared_in_parallel(pipeline, corpus_root, tmp_path):
  """3 shards built by 2 concurrent preparers == built one by one; every document kept."""
  import threading

  def sharded(cache):
    config = make_config(corpus_root, str(tmp_path / cache), tokenizer=pipeline.vocab.path)
    config.data.sources.default.num_shards = 3
    return config

  results, errors = [], []

  def work():
    try:
      results.append(make_pipeline(sharded("parallel"), process_index=0, process_count=1))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=work) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=300)
  assert not errors and len(results) == 2
  sequential = make_pipeline(sharded("sequential"), process_index=0, process_count=1)
  assert sequential.stores[0].manifest["num_shards"] == 3
  _assert_same_store_bytes(results[0].stores[0].directory, sequential.stores[0].directory)
  assert all(s["train"]["rows"] > 0 for s in sequential.stores[0].manifest["shards"])
  sp = spm.SentencePieceProcessor(model_proto=pipeline.vocab.model_bytes)
  source = sequential.config.sources[0]
  for split, rows in ((corpus.TRAIN, sequential.stores[0].train),
                      (corpus.VALIDATION, sequential.stores[0].validation)):
    docs = [text for _, text in corpus.read_default(source, split)]
    want = collections.Counter(reference_chunks(docs, sp, SEQ))
    assert collections.Counter(stored_segments(rows)) == want, split
  for k in (0, 7, 400):
    np.testing.assert_array_equal(results[1].batch(k)["targets"], sequential.batch(k)["targets"])
  _, idx = sequential.source_of(np.arange(16, 24))  # rows come from across the shards
  np.testing.assert_array_equal(sequential.batch(2)["targets"],
                                sequential.stores[0].train.targets[idx])


def test_features_match_seqio_lm_feature_converter():
  import seqio
  import tensorflow as tf

  rng = np.random.default_rng(0)
  docs = [rng.integers(4, 500, size=rng.integers(1, 40)).astype(np.int32) for _ in range(60)]
  ds = tf.data.Dataset.from_generator(
      lambda: ({"targets": d} for d in docs),
      output_signature={"targets": tf.TensorSpec([None], tf.int32)})
  for bos in (0, 2):
    packed = list(seqio.LMFeatureConverter(pack=True, bos_id=bos)(ds, {"targets": 48})
                  .as_numpy_iterator())
    want = {k: np.stack([p[k] for p in packed]) for k in packed[0]}
    got = data.derive_features(want["decoder_target_tokens"], want["decoder_segment_ids"], bos)
    np.testing.assert_array_equal(got["inputs"], want["decoder_input_tokens"])
    np.testing.assert_array_equal(got["positions"], want["decoder_positions"])
    np.testing.assert_array_equal(got["loss_weights"], want["decoder_loss_weights"])
    assert got["loss_weights"].dtype == np.float32 and got["inputs"].dtype == np.int32


# ---------------------------------------------------------------- determinism and resume


def test_permutation_is_a_bijection():
  for n in (1, 2, 3, 7, 64, 1000, 4097):
    for key in (0, 1, 12345):
      assert sorted(permute.permute(np.arange(n), n, key).tolist()) == list(range(n))
  assert not np.array_equal(permute.permute(np.arange(100), 100, 1),
                            permute.permute(np.arange(100), 100, 2))


def test_epochs_cover_every_row_once_and_reshuffle(pipeline):
  n = pipeline.num_train_rows
  _, first = pipeline.source_of(np.arange(n))
  _, second = pipeline.source_of(np.arange(n, 2 * n))
  assert sorted(first.tolist()) == list(range(n)) == sorted(second.tolist())
  assert not np.array_equal(first, second)


def test_batches_independent_of_process_count_and_resume(pipeline, corpus_root, cache_dir):
  config = make_config(corpus_root, cache_dir)
  steps_per_epoch = pipeline.num_train_rows // 8
  steps = [0, 1, 2, steps_per_epoch, steps_per_epoch + 1, 5 * steps_per_epoch + 3]
  full = {k: pipeline.batch(k) for k in steps}
  for count in (2, 4, 8):
    parts = [make_pipeline(config, process_index=p, process_count=count) for p in range(count)]
    for k in steps:
      for key in full[k]:
        np.testing.assert_array_equal(
            np.concatenate([p.batch(k)[key] for p in parts]), full[k][key])
  resumed = make_pipeline(config, process_index=0, process_count=1)
  for k in (2, 3, 4):
    want = pipeline.batch(k)
    got = resumed.batch(k)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  # The batch rows are the stored rows named by the determinism map.
  _, idx = pipeline.source_of(np.arange(8, 16))
  np.testing.assert_array_equal(full[1]["targets"], pipeline.stores[0].train.targets[idx])
  other = make_pipeline(make_config(corpus_root, cache_dir, seed=1), process_index=0,
                             process_count=1)
  assert not np.array_equal(other.batch(0)["targets"], full[0]["targets"])


def test_global_arrays_on_8_devices_equal_single_process_batch(pipeline):
  devices = np.array(jax.devices())
  assert devices.size == 8
  for order in (devices, devices[::-1]):
    mesh = jax.sharding.Mesh(order.reshape(4, 2), ("data", "model"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    arrays = data.global_batch(pipeline, 3, sharding)
    want = pipeline.batch(3)
    for key in want:
      assert arrays[key].shape == (8, SEQ) and arrays[key].sharding == sharding
      np.testing.assert_array_equal(np.asarray(arrays[key]), want[key])


def test_eval_batches_cover_validation_rows_in_order(pipeline):
  batches = list(pipeline.eval_batches())
  n = pipeline.num_eval_rows
  assert len(batches) == -(-n // 8)
  targets = np.concatenate([b["targets"] for b in batches])
  np.testing.assert_array_equal(targets[:n], pipeline.stores[0].validation.targets)
  assert not np.concatenate([b["loss_weights"] for b in batches])[n:].any()


# ---------------------------------------------------------------- sources


def _write_file_corpora(root) -> dict[str, list[str]]:
  """Small documents (each shorter than SEQ tokens) in every file format; returns format -> docs."""
  import tensorflow as tf

  docs = [f"document {i}: the {'quick' if i % 2 else 'lazy'} fox no. {i * 7}" for i in range(40)]
  docs.append("unicode ✓ ünï")
  out = {}
  (root / "text").mkdir()
  for i, d in enumerate(docs):
    (root / "text" / f"doc{i:02d}.txt").write_text(d, encoding="utf-8")
  out["text"] = docs
  (root / "lines").mkdir()
  (root / "lines" / "a.txt").write_text("\n".join(docs[:20]) + "\n", encoding="utf-8")
  (root / "lines" / "b.txt").write_text("\n\n".join(docs[20:]), encoding="utf-8")
  out["lines"] = docs
  (root / "jsonl").mkdir()
  with open(root / "jsonl" / "a.jsonl", "w", encoding="utf-8") as f:
    for i, d in enumerate(docs):
      f.write(json.dumps({"id": i, "body": d}) + "\n")
  out["jsonl"] = docs
  (root / "tfrecord").mkdir()
  with tf.io.TFRecordWriter(str(root / "tfrecord" / "a.tfrecord")) as w:
    for d in docs:
      ex = tf.train.Example(features=tf.train.Features(feature={
          "body": tf.train.Feature(bytes_list=tf.train.BytesList(value=[d.encode()]))}))
      w.write(ex.SerializeToString())
  out["tfrecord"] = docs
  return out


def _decoded_docs(p: data.Pipeline, split) -> list[str]:
  return [p.vocab.decode(seg[:-1]) for seg in stored_segments(split)]  # drop EOS


@pytest.mark.parametrize("fmt,pattern,key", [
    ("text", "text/doc0*.txt,text/doc[1-4]*.txt", "text"),
    ("lines", "lines/*.txt", "text"),
    ("jsonl", "jsonl/*.jsonl", "body"),
    ("tfrecord", "tfrecord/*", "body"),
])
def test_file_sources(fmt, pattern, key, corpus_root, cache_dir, tmp_path):
  docs = _write_file_corpora(tmp_path)[fmt]
  config = make_config(corpus_root, cache_dir)
  globs = ",".join(str(tmp_path / p) for p in pattern.split(","))
  config.data.sources = ml_collections.ConfigDict({"web": base.data_source(
      "files", pattern=globs, format=fmt, text_key=key, validation_fraction=0.2)})
  p = make_pipeline(config, process_index=0, process_count=1)
  train, val = _decoded_docs(p, p.stores[0].train), _decoded_docs(p, p.stores[0].validation)
  assert sorted(train + val) == sorted(docs)
  assert train and val and not set(train) & set(val)
  if fmt == "lines":  # the split survives moving the corpus (ids are relative to the glob root)
    shutil.copytree(tmp_path / "lines", tmp_path / "elsewhere" / "lines")
    config.data.sources.web.pattern = str(tmp_path / "elsewhere" / "lines" / "*.txt")
    moved = make_pipeline(config, process_index=0, process_count=1)
    assert moved.stores[0].directory != p.stores[0].directory
    assert sorted(_decoded_docs(moved, moved.stores[0].validation)) == sorted(val)


def test_file_source_with_eval_pattern(corpus_root, cache_dir, tmp_path):
  docs = _write_file_corpora(tmp_path)["lines"]
  config = make_config(corpus_root, cache_dir)
  config.data.sources = ml_collections.ConfigDict({"web": base.data_source(
      "files", pattern=str(tmp_path / "lines" / "a.txt"), format="lines",
      eval_pattern=str(tmp_path / "lines" / "b.txt"))})
  p = make_pipeline(config, process_index=0, process_count=1)
  assert sorted(_decoded_docs(p, p.stores[0].train)) == sorted(docs[:20])
  assert sorted(_decoded_docs(p, p.stores[0].validation)) == sorted(docs[20:])


def test_tfds_source_with_mock_data(corpus_root, cache_dir, tmp_path):
  import tensorflow_datasets as tfds

  config = make_config(corpus_root, cache_dir)
  config.data.sources = ml_collections.ConfigDict({"lm1b": base.data_source(
      "tfds", tfds_name="lm1b:1.1.0", tfds_data_dir=str(tmp_path), eval_split="test")})
  with tfds.testing.mock_data(num_examples=30):
    want = {s: sorted(ex["text"].decode() for ex in tfds.as_numpy(
        tfds.load("lm1b", split=s, data_dir=str(tmp_path)))) for s in ("train", "test")}
    p = make_pipeline(config, process_index=0, process_count=1)
  assert len(want["train"]) == 30
  assert sorted(_decoded_docs(p, p.stores[0].train)) == want["train"]
  assert sorted(_decoded_docs(p, p.stores[0].validation)) == want["test"]


def test_mixture_rates_and_rows(pipeline, corpus_root, cache_dir, tmp_path):
  _write_file_corpora(tmp_path)
  config = make_config(corpus_root, cache_dir)
  config.data.sources = ml_collections.ConfigDict({
      "default": base.data_source("default", rate=3.0, default_root=corpus_root,
                                  validation_fraction=0.15),
      "web": base.data_source("files", rate=1.0, pattern=str(tmp_path / "jsonl" / "*"),
                              format="jsonl", text_key="body")})
  p = make_pipeline(config, process_index=0, process_count=1)
  period = data.pipeline.MIXTURE_PERIOD
  src, idx = p.source_of(np.arange(3 * period))
  assert (src == 0).sum() == 3 * 3 * period // 4 and (src == 1).sum() == 3 * period // 4
  # Each source's stream is consumed in order: its k-th row is row k of its own epoch sequence.
  for i in (0, 1):
    n = p.stores[i].train.num_rows
    j = np.arange((src == i).sum())
    key = lambda e: permute.derive_key(p.config.seed, p.config.sources[i].name, e)  # noqa: E731
    want = np.concatenate([permute.permute(j[j // n == e] % n, n, key(e))
                           for e in np.unique(j // n)])
    np.testing.assert_array_equal(idx[src == i], want)
  import seqio

  from recurrentgemma_tpu.data import prepare  # pylint: disable=g-import-not-at-top

  task_names, mixture_name = prepare.register_seqio(p)
  mixture = seqio.get_mixture_or_task(mixture_name)
  assert sorted(t.name for t in mixture.tasks) == sorted(task_names)
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == dict(zip(task_names, (3.0, 1.0)))
  # The default source's store is shared with the single-source pipeline (same key).
  assert p.stores[0].directory == pipeline.stores[0].directory
  b = p.batch(5)
  s, r = p.source_of(np.arange(40, 48))
  for row in range(8):
    np.testing.assert_array_equal(b["targets"][row], p.stores[s[row]].train.targets[r[row]])


# ---------------------------------------------------------------- errors


def _expect(config, match, exc=ValueError, **kw):
  with pytest.raises(exc, match=match):
    make_pipeline(config, process_index=kw.get("index", 0), process_count=kw.get("count", 1))


def test_errors_name_the_bad_value(corpus_root, cache_dir, tmp_path):
  def files_config(**source):
    c = make_config(corpus_root, cache_dir)
    c.data.sources = ml_collections.ConfigDict({"web": base.data_source("files", **source)})
    return c

  _expect(make_config(corpus_root, cache_dir, seq_len=0), r"config.data.seq_len=0")
  _expect(make_config(corpus_root, cache_dir, global_batch_size=6), r"global_batch_size=6.*4",
          count=4)
  missing = str(tmp_path / "nope" / "*.txt")
  _expect(files_config(pattern=missing),
          re.escape(f"config.data.sources.web.pattern: no file matches '{missing}'"),
          data.CorpusError)
  (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
  _expect(files_config(pattern=str(tmp_path / "empty.txt"), format="lines"),
          "config.data.sources.web .files. has no training documents", data.CorpusError)
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"fine line\nnot utf8 \xff\xfe here\n")
  _expect(files_config(pattern=str(bad), format="lines"),
          rf"{bad} \(record 1\) is not valid UTF-8", data.CorpusError)
  badjson = tmp_path / "bad.jsonl"
  badjson.write_text('{"text": "ok"}\n{"text": 3}\n', encoding="utf-8")
  _expect(files_config(pattern=str(badjson), format="jsonl"),
          rf"{badjson} \(line 2\) has no string field 'text'", data.CorpusError)
  corrupt = tmp_path / "corrupt.tfrecord"
  corrupt.write_bytes(b"\x00" * 7 + b"not a tfrecord at all")
  _expect(files_config(pattern=str(corrupt), format="tfrecord"), rf"cannot read {corrupt}",
          data.CorpusError)
  _expect(files_config(pattern=str(bad), format="csv"), r"format='csv'; valid formats")
  c = make_config(corpus_root, cache_dir)
  c.data.sources.rare = base.data_source("files", rate=1e-4, pattern=missing)  # checked first
  _expect(c, r"config.data.sources.rare.rate=0.0001 is below 1/4096 of the total rate")
  c = make_config(corpus_root, cache_dir)
  c.data.sources.default.kind = "hf"
  _expect(c, r"kind='hf'; valid kinds")
  c.data.sources.default.kind = "tfds"
  c.data.sources.default.tfds_name = "c4/en"
  _expect(c, r"tfds_name='c4/en' has no version")
  c.data.sources.default.tfds_name = "lm1b:1.1.0"
  c.data.sources.default.tfds_data_dir = str(tmp_path / "no_tfds")  # never built: no download
  _expect(c, r"sources.default: cannot open TFDS 'lm1b:1.1.0' split 'train' in data_dir "
          r".*no_tfds'", data.CorpusError)
  _expect(make_config(corpus_root, cache_dir, tokenizer=str(tmp_path / "no.model")),
          r"tokenizer=.*no.model' does not exist", data.TokenizerError)
  small = make_config(corpus_root, str(tmp_path / "c1"))
  small.model.vocab_size = 100
  _expect(small, r"config.model.vocab_size=100 is too small .* at least 263", data.TokenizerError)
  small.model.vocab_size = 200_000  # more pieces than the 26-file corpus can make
  _expect(small, r"embedded tokenizer at config.model.vocab_size=200000 on .* failed",
          data.TokenizerError)
  (tmp_path / "junk.model").write_bytes(b"not a model")
  _expect(make_config(corpus_root, cache_dir, tokenizer=str(tmp_path / "junk.model")),
          r"junk.model' is not a SentencePiece model", data.TokenizerError)


def test_user_tokenizer_by_path(pipeline, corpus_root, cache_dir, tmp_path):
  path = tmp_path / "user.model"
  path.write_bytes(pipeline.vocab.model_bytes)
  config = make_config(corpus_root, cache_dir, tokenizer=str(path))
  p = make_pipeline(config, process_index=0, process_count=1)
  np.testing.assert_array_equal(p.batch(0)["targets"], pipeline.batch(0)["targets"])
  config.model.vocab_size = VOCAB - 1
  _expect(config, rf"has {VOCAB} pieces but config.model.vocab_size={VOCAB - 1}",
          data.TokenizerError)


# ---------------------------------------------------------------- multi-process (jax.distributed)

_MP_STEPS = (0, 1, 5, 40, 300)  # 300 steps of 8 rows is past the first epoch


@pytest.mark.slow
def test_two_processes_build_the_single_process_global_batches(pipeline, corpus_root, cache_dir,
                                                              tmp_path):
  """2 jax.distributed processes (gloo CPU collectives, 2 devices each) == 1 process."""
  import socket
  import subprocess
  import sys

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd(),
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  # A cold cache: both processes find nothing, one trains the tokenizer and prepares the store
  # while the other waits on the lock; the batches must still equal those of the parent's cache.
  cold = str(tmp_path / "cold_cache")
  procs = [subprocess.Popen(
      [sys.executable, __file__, "worker", str(pid), str(port), corpus_root, cold,
       str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
      for pid in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  for order in ("forward", "reversed"):
    got = np.load(tmp_path / f"global_{order}.npz")
    for step in _MP_STEPS:
      want = pipeline.batch(step)
      for key in want:
        np.testing.assert_array_equal(got[f"{step}/{key}"], want[key], err_msg=f"{order} {step}")
  # Each process read only its own block: rows 0-3 on process 0, 4-7 on process 1 by default.
  for pid in range(2):
    local = np.load(tmp_path / f"local_{pid}.npz")
    for step in _MP_STEPS:
      np.testing.assert_array_equal(local[f"{step}/targets"],
                                    pipeline.batch(step)["targets"][4 * pid:4 * pid + 4])


def _worker(pid: int, port: int, corpus_root: str, cache_dir: str, out: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=pid, initialization_timeout=120)
  from jax.experimental import multihost_utils

  assert jax.process_count() == 2 and jax.device_count() == 4
  p = make_pipeline(make_config(corpus_root, cache_dir))  # process index/count from jax
  np.savez(os.path.join(out, f"local_{pid}.npz"),
           **{f"{k}/targets": p.batch(k)["targets"] for k in _MP_STEPS})
  devices = np.array(jax.devices())
  for order, devs in (("forward", devices), ("reversed", devices[::-1])):
    mesh = jax.sharding.Mesh(devs, ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    result = {}
    for step in _MP_STEPS:
      arrays = data.global_batch(p, step, sharding)
      for key, value in multihost_utils.process_allgather(arrays, tiled=True).items():
        result[f"{step}/{key}"] = np.asarray(value)
    if pid == 0:
      np.savez(os.path.join(out, f"global_{order}.npz"), **result)
  jax.distributed.shutdown()


if __name__ == "__main__":
  import sys

  assert sys.argv[1] == "worker", sys.argv
  _worker(int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:7])


@pytest.mark.parametrize("pattern", ["*.jsonl", "*/*.jsonl", "d*/x?.jsonl", "[ab]*"])
def test_gs_globs_select_what_a_local_glob_selects(tmp_path, pattern):
  """gs:// globs are matched on a listing (corpus._matches); tf.io.gfile.glob on the same tree
  is the reference: `*` does not cross a directory."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for rel in ("a.jsonl", "b.jsonl", "d1/x1.jsonl", "d1/sub/x2.jsonl", "d2/y.jsonl", "ab/c"):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text("{}\n")
  listing = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()]
  ours = sorted(p for p in listing if corpus._matches(p, pattern))  # pylint: disable=protected-access
  reference = sorted(os.path.relpath(m, tmp_path)
                     for m in tf.io.gfile.glob(str(tmp_path / pattern)) if not tf.io.gfile.isdir(m))
  assert ours == reference and ours
