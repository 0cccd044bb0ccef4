"""Preparing stores as an Apache Beam pipeline: one element per (source, shard), any runner.

The transform is `store.prepare_shard`, the same function the in-process path calls, so a store
written by 1 or 100 Beam workers, by the DirectRunner or by Dataflow, has the same bytes. The
pipeline writes shard objects and their stats; the driver writes each source's manifest after the
pipeline has finished, so a reader never sees a store whose shards are not all there. Shards whose
stats exist already (a re-run after a failure) are not prepared again.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from recurrentgemma_tpu.data import store, vocab as vocab_lib
from recurrentgemma_tpu.data.config import DataConfig


@dataclasses.dataclass(frozen=True)
class SourcePlan:
  """What one source needs: its key and store directory, and its shards still to prepare."""

  index: int
  key: str
  desc: dict
  directory: str
  missing: tuple[int, ...]
  done: bool  # the manifest exists: nothing to do


def runner_options(runner: str, num_workers: int) -> dict:
  """Beam options for `runner` (one of BEAM_RUNNERS, checked by the caller) with `num_workers`."""
  if runner == "DirectRunner":
    # multi_processing: N worker processes, as on a cluster (in_memory would be one process).
    return {"direct_running_mode": "multi_processing", "direct_num_workers": num_workers}
  if runner == "DataflowRunner":
    return {"num_workers": num_workers, "max_num_workers": num_workers}
  if runner == "FlinkRunner":
    return {"parallelism": num_workers}
  return {}


def plan(cfg: DataConfig, vocab: vocab_lib.Vocabulary, store_root: str) -> list[SourcePlan]:
  plans = []
  for i, source in enumerate(cfg.sources):
    key, desc = store.store_key(cfg, source, vocab)
    directory = store.store_dir(store_root, source, key)
    done = store.read_text(store.join(directory, store.MANIFEST)) is not None
    stats = [] if done else store.read_shard_stats(directory, source.num_shards)
    plans.append(SourcePlan(i, key, desc, directory,
                            tuple(s for s, st in enumerate(stats) if st is None), done))
  return plans


class PrepareShard(beam.DoFn):
  """Prepares one (source index, shard) element with `store.prepare_shard`; yields its stats."""

  def __init__(self, cfg: DataConfig, tokenizer_bytes: bytes, plans: Sequence[SourcePlan]):
    super().__init__()
    self.cfg, self.tokenizer_bytes, self.plans = cfg, tokenizer_bytes, list(plans)
    self._tmp = None
    self._vocab = None

  def setup(self):
    # Workers may not see the driver's files (Dataflow): the tokenizer travels as bytes.
    self._tmp = tempfile.mkdtemp(prefix="rg-prepare-")
    path = os.path.join(self._tmp, "tokenizer.model")
    with open(path, "wb") as f:
      f.write(self.tokenizer_bytes)
    self._vocab = vocab_lib.Vocabulary(path, self.cfg.vocab_size)

  def process(self, element):
    index, shard = element
    p = self.plans[index]
    yield store.prepare_shard(self.cfg, self.cfg.sources[index], self._vocab, p.key, shard,
                              p.directory)

  def teardown(self):
    if self._tmp:
      shutil.rmtree(self._tmp, ignore_errors=True)


def prepare(cfg: DataConfig, store_root: str, runner: str, num_workers: int,
            pipeline_args: Sequence[str] = ()) -> list[dict]:
  """Prepares every source's store under `store_root` on a Beam runner; returns the manifests."""
  vocab = vocab_lib.Vocabulary(vocab_lib.tokenizer_path(cfg), cfg.vocab_size)
  plans = plan(cfg, vocab, store_root)
  work = [(p.index, s) for p in plans for s in p.missing]
  if work:
    options = PipelineOptions(list(pipeline_args), runner=runner,
                              **runner_options(runner, num_workers))
    with beam.Pipeline(options=options) as pipeline:
      _ = (pipeline
           | "Shards" >> beam.Create(work)
           | "Spread" >> beam.Reshuffle()
           | "Prepare" >> beam.ParDo(PrepareShard(cfg, vocab.model_bytes, plans)))
  manifests = []
  for p in plans:
    source = cfg.sources[p.index]
    if not p.done:
      stats = store.read_shard_stats(p.directory, source.num_shards)
      store.write_manifest(cfg, source, vocab, p.key, p.desc, p.directory, stats)
    manifests.append(store.open_source(cfg, source, vocab, store_root).manifest)
  return manifests
