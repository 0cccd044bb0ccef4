"""seqio Tasks and Mixtures for the configured sources, and their packed, tokenized examples.

Each source becomes a registered `seqio.Task` (a FunctionDataSource over our readers, or a
TfdsDataSource) with the standard tokenize / append-EOS preprocessors plus one that cuts long
documents into pieces of at most `seq_len` tokens; `seqio.LMFeatureConverter(pack=True)` packs them.
Several sources are also registered as a `seqio.Mixture` with their rates, for users of seqio's own
tools; the training pipeline mixes at the row level instead (see pipeline.py for why).

This module imports TensorFlow: store.prepare uses it to build stores, and data.prepare to register
the tasks for seqio's tools; the batch path (memory-mapped stores, numpy) never touches it.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable, Iterator

import numpy as np
import seqio
import tensorflow as tf

from recurrentgemma_tpu.data import corpus
from recurrentgemma_tpu.data.config import DataConfig, SourceConfig
from recurrentgemma_tpu.data.vocab import Vocabulary

# Documents held in the pre-packing shuffle buffer; enough to separate neighbouring documents of
# one file, small enough to keep preparation memory flat.
SHUFFLE_BUFFER = 4096
_REGISTRY_LOCK = threading.Lock()


class ReaderErrors:
  """Keeps the first exception raised inside a tf.data generator, which TF would otherwise wrap
  into an opaque InvalidArgumentError, so packed_examples() can re-raise it as is."""

  def __init__(self):
    self.error: BaseException | None = None
    self._lock = threading.Lock()

  def record(self, e: BaseException) -> None:
    with self._lock:
      if self.error is None:
        self.error = e


def _docs_dataset(reader: Callable[[SourceConfig, str], Iterator[tuple[str, str]]],
                  source: SourceConfig, errors: ReaderErrors, split: str,
                  shuffle_files: bool = False, seed: int | None = None) -> tf.data.Dataset:
  del shuffle_files, seed  # order is fixed here; shuffling happens once, seeded, in prepare()

  def gen():
    try:
      for n, (_, text) in enumerate(reader(source, split)):
        if source.max_documents and n >= source.max_documents:
          return
        yield {"text": text}
    except Exception as e:  # re-raised by packed_examples() as is
      errors.record(e)
      raise

  return tf.data.Dataset.from_generator(
      gen, output_signature={"text": tf.TensorSpec((), tf.string)})


@seqio.map_over_dataset
def _select_text(example, text_key):
  return {"text": example[text_key]}


def _take(dataset: tf.data.Dataset, n: int) -> tf.data.Dataset:
  return dataset.take(n) if n else dataset


def _split_into_chunks(dataset: tf.data.Dataset, sequence_length) -> tf.data.Dataset:
  """Cuts each tokenized document into consecutive pieces of at most seq_len tokens.

  Packing trims rather than splits, which would drop everything past the first seq_len tokens of
  a long document (most stdlib modules, most books).
  """
  length = sequence_length["targets"]

  def chunks(example):
    tokens = example["targets"]
    n = tf.size(tokens)
    starts = tf.range(0, n, length)
    ragged = tf.RaggedTensor.from_row_splits(tokens, tf.concat([starts, [n]], axis=0))
    return tf.data.Dataset.from_tensor_slices({"targets": ragged})

  return dataset.flat_map(chunks)


def task_name(source: SourceConfig, key: str) -> str:
  return f"recurrentgemma_tpu.{source.name}.{key[:12]}"


def register_task(source: SourceConfig, key: str, vocab: Vocabulary,
                  errors: ReaderErrors) -> seqio.Task:
  """Registers (once per content key) and returns the seqio Task of one source."""
  name = task_name(source, key)
  preprocessors: list = []
  if source.kind == "tfds":
    splits = {corpus.TRAIN: source.train_split}
    if source.eval_split:
      splits[corpus.VALIDATION] = source.eval_split
    # read_only: never download or generate a dataset from here; on a pod every host would try,
    # and without network access it could hang. Datasets are built beforehand (`tfds build`).
    data_source = seqio.TfdsDataSource(
        tfds_name=source.tfds_name, tfds_data_dir=source.tfds_data_dir or None, splits=splits,
        read_only=True)
    preprocessors += [functools.partial(_select_text, text_key=source.text_key),
                      functools.partial(_take, n=source.max_documents)]
  else:
    reader = corpus.read_default if source.kind == "default" else corpus.read_files
    data_source = seqio.FunctionDataSource(
        dataset_fn=functools.partial(_docs_dataset, reader, source, errors),
        splits=list(corpus.SPLITS))
  preprocessors += [
      functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
      seqio.preprocessors.tokenize,
      seqio.preprocessors.append_eos,
      _split_into_chunks,
  ]
  with _REGISTRY_LOCK:  # threads of one process may prepare shards of the same source
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)  # a fresh error holder per preparation
    return seqio.TaskRegistry.add(
        name,
        source=data_source,
        preprocessors=preprocessors,
        output_features={"targets": seqio.Feature(
            vocabulary=vocab.seqio_vocabulary(), add_eos=True, dtype=tf.int32)},
    )


def ensure_task(source: SourceConfig, key: str, vocab: Vocabulary) -> str:
  """Registers the Task of an already prepared source (for seqio tools); returns its name."""
  name = task_name(source, key)
  with _REGISTRY_LOCK:
    registered = name in seqio.TaskRegistry.names()
  if not registered:
    register_task(source, key, vocab, ReaderErrors())
  return name


def register_mixture(cfg: DataConfig, task_names: list[str]) -> str:
  """Registers the configured sources as a seqio.Mixture with their rates; returns its name."""
  desc = "\0".join(f"{n}:{s.rate!r}" for n, s in zip(task_names, cfg.sources))
  name = f"recurrentgemma_tpu.mixture.{hashlib.sha256(desc.encode()).hexdigest()[:12]}"
  with _REGISTRY_LOCK:
    if name not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(name, [(n, s.rate) for n, s in zip(task_names, cfg.sources)])
  return name


def packed_examples(task: seqio.Task, source: SourceConfig, split: str, cfg: DataConfig,
                    vocab: Vocabulary, errors: ReaderErrors,
                    shard: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Packed rows of one shard of one split: `targets` and `segment_ids`, each [seq_len] int32.

  The training split's document pieces are shuffled once with the data seed before packing, so a
  row is not a run of consecutive lines of one file. Shards are seqio's: by file for TFDS when the
  split has enough files, otherwise every num_shards-th document (read by all, tokenized by one).
  """
  lengths = {"targets": cfg.seq_len}
  shard_info = (seqio.ShardInfo(index=shard, num_shards=source.num_shards)
                if source.num_shards > 1 else None)
  # try_in_mem_cache=False: preparation reads each split once, so an in-memory copy only costs RAM.
  try:
    ds = task.get_dataset(sequence_length=lengths, split=split, shuffle=False, use_cached=False,
                          num_epochs=1, try_in_mem_cache=False, shard_info=shard_info)
  except (AssertionError, ValueError, KeyError, OSError, tf.errors.OpError) as e:
    if source.kind != "tfds":
      raise
    tfds_split = source.train_split if split == corpus.TRAIN else source.eval_split
    raise corpus.CorpusError(
        f"config.data.sources.{source.name}: cannot open TFDS {source.tfds_name!r} split "
        f"{tfds_split!r} in data_dir {source.tfds_data_dir or '(TFDS default)'!r}: {e} "
        "(build it first, e.g. `tfds build NAME --data_dir=DIR`; nothing is downloaded from here; "
        "set eval_split to a split the builder has, or to '' for none)") from None
  if split == corpus.TRAIN:
    ds = ds.shuffle(SHUFFLE_BUFFER, seed=cfg.seed, reshuffle_each_iteration=False)
  ds = seqio.LMFeatureConverter(pack=True, bos_id=vocab.bos_id)(ds, lengths)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  try:
    for ex in ds.as_numpy_iterator():
      yield {"targets": ex["decoder_target_tokens"], "segment_ids": ex["decoder_segment_ids"]}
  except tf.errors.OpError as e:
    if errors.error is not None:
      raise errors.error from None
    raise corpus.CorpusError(f"task {task.name} ({split}): {e.message}") from None
  if errors.error is not None:
    raise errors.error
