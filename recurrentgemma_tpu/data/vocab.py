"""SentencePiece vocabulary: a user's model by path, or one trained on the embedded corpus.

The embedded tokenizer is trained the first time it is needed and cached under the data cache
directory, keyed by the corpus fingerprint and the vocabulary size; training is single-threaded on
a fixed, ordered input so every machine builds the same model bytes.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator

import sentencepiece as spm

from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import workdir as workdir_lib
from recurrentgemma_tpu.data import corpus, locks
from recurrentgemma_tpu.data.config import DataConfig, SourceConfig

# Same special-id layout as the Gemma tokenizer, so a user's Gemma model and ours agree.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
# Lines longer than this are split for training only (SentencePiece skips over-long sentences).
_MAX_TRAIN_LINE = 2048
# Caps the training text (the stdlib is about 12M characters) so a large default_root stays quick.
_MAX_TRAIN_CHARS = 24_000_000


class TokenizerError(ValueError):
  """A tokenizer path is missing, unreadable, or does not fit the model's vocabulary."""


def _training_lines(source: SourceConfig) -> Iterator[str]:
  total = 0
  for _, text in corpus.read_default(source, corpus.TRAIN):
    for line in text.split("\n"):
      if not line.strip():
        continue
      for start in range(0, len(line), _MAX_TRAIN_LINE):
        piece = line[start:start + _MAX_TRAIN_LINE]
        total += len(piece)
        if total > _MAX_TRAIN_CHARS:
          return
        yield piece


def _train(source: SourceConfig, vocab_size: int, path: str) -> None:
  """Trains the embedded tokenizer and writes it atomically to `path`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  # 256 byte pieces, 4 special ids and 2 user symbols must fit before any learned piece.
  minimum = 256 + 4 + 2 + 1
  if vocab_size < minimum:
    raise TokenizerError(f"config.model.vocab_size={vocab_size} is too small for the embedded "
                         f"byte-fallback tokenizer; use at least {minimum}, or give "
                         "config.data.tokenizer.")
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.info("training the embedded tokenizer (%d pieces, once per cache) ...", vocab_size)
  try:
    _run_trainer(source, vocab_size, tmp)
  except RuntimeError as e:  # SentencePiece reports e.g. a vocabulary larger than the corpus allows
    if os.path.exists(tmp):
      os.remove(tmp)
    raise TokenizerError(f"training the embedded tokenizer at config.model.vocab_size="
                         f"{vocab_size} on {corpus.default_root(source)!r} failed: {e}") from None
  os.replace(tmp, path)


def _run_trainer(source: SourceConfig, vocab_size: int, tmp: str) -> None:
  with open(tmp, "wb") as out:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(source),
        model_writer=out,
        vocab_size=vocab_size,
        # BPE, like Gemma's tokenizer: its merge order makes segmentation unique, whereas unigram
        # Viterbi ties (e.g. two whitespace pieces in either order) are broken differently by
        # tf_text's SentencePiece build (used in seqio's TF preprocessing) and the Python one.
        model_type="bpe",
        # Code and prose: keep whitespace and case exactly so decode(encode(x)) == x.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,  # any UTF-8 text encodes, nothing maps to <unk>
        user_defined_symbols=["\n", "\t"],  # newlines never occur in line-wise training input
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        character_coverage=0.9995,
        shuffle_input_sentence=False,
        num_threads=1,  # one thread: no dependence on how work is split
        minloglevel=2,
    )


def embedded_model_path(cfg: DataConfig, source: SourceConfig) -> str:
  key = hashlib.sha256(
      # The training text is the corpus's train split, so the held-out fraction is part of it.
      f"spm-bpe-v1\0{corpus.default_fingerprint(source)}\0{source.validation_fraction!r}\0"
      f"{cfg.vocab_size}".encode()
  ).hexdigest()[:16]
  return os.path.join(cfg.resolved_cache_dir, "tokenizers", f"embedded-{cfg.vocab_size}-{key}.model")


def tokenizer_path(cfg: DataConfig) -> str:
  """Path of the SentencePiece model to use, training the embedded one if it is not cached."""
  if cfg.tokenizer:
    path = cfg.tokenizer
    if not workdir_lib.is_remote(path):
      found = os.path.exists(path)
    else:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top

      found = tf.io.gfile.exists(path)
    if not found:
      raise TokenizerError(f"config.data.tokenizer={path!r} does not exist.")
    return path
  # The default source's own settings (e.g. a custom default_root) decide the corpus, if present.
  default = next((s for s in cfg.sources if s.kind == "default"), None)
  if default is None:
    default = SourceConfig(
        name="default", kind="default", rate=1.0, default_root="", tfds_name="",
        tfds_data_dir="", train_split="", eval_split="", pattern="", eval_pattern="",
        format="text", text_key="", validation_fraction=0.02, max_documents=0, num_shards=1)
  path = embedded_model_path(cfg, default)
  if not os.path.exists(path):
    with locks.exclusive(path):
      if not os.path.exists(path):  # another local process may have trained it meanwhile
        _train(default, cfg.vocab_size, path)
  return path


def _read_model(path: str) -> bytes:
  """A tokenizer file's bytes: a local file directly, so that a process whose only need is the
  tokenizer (every training process but the first) does not start TensorFlow; other filesystems
  (gs://, ...) through tf.io.gfile."""
  if not workdir_lib.is_remote(path):
    try:
      with open(path, "rb") as f:
        return f.read()
    except OSError as e:
      raise TokenizerError(f"cannot read tokenizer {path!r}: {e.strerror or e}") from None
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  except tf.errors.OpError as e:
    raise TokenizerError(f"cannot read tokenizer {path!r}: {e.message}") from None


class Vocabulary:
  """Encode/decode for the sampler and the pipeline; wraps one SentencePiece model."""

  def __init__(self, path: str, model_vocab_size: int):
    self.model_bytes = _read_model(path)
    self.path = path
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self.model_bytes)
    except (RuntimeError, OSError) as e:
      raise TokenizerError(f"{path!r} is not a SentencePiece model: {e}") from None
    if self._sp.vocab_size() > model_vocab_size:
      raise TokenizerError(
          f"tokenizer {path!r} has {self._sp.vocab_size()} pieces but config.model.vocab_size="
          f"{model_vocab_size}; the embedding must cover every id, so raise vocab_size.")
    if self._sp.eos_id() < 0:
      raise TokenizerError(f"tokenizer {path!r} defines no EOS id; documents need one to end.")
    self.sha256 = hashlib.sha256(self.model_bytes).hexdigest()

  @property
  def size(self) -> int:
    return self._sp.vocab_size()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    """First input of every document; the pad id 0 when the tokenizer has no BOS (seqio's rule)."""
    return max(self._sp.bos_id(), 0)

  @property
  def pad_id(self) -> int:
    return max(self._sp.pad_id(), 0)

  def encode(self, text: str) -> list[int]:
    return self._sp.EncodeAsIds(text)

  def decode(self, ids) -> str:
    return self._sp.DecodeIds([int(i) for i in ids])

  def seqio_vocabulary(self):
    """The same model as a `seqio.SentencePieceVocabulary` (imports TensorFlow)."""
    import seqio  # pylint: disable=g-import-not-at-top

    return seqio.SentencePieceVocabulary(self.path)


def existing_tokenizer_path(data: DataConfig) -> str:
  """The tokenizer a run was trained with, found but never trained or written here.

  For the tools that read a run (sample, export, evaluate): its config.json may come from a workdir
  someone else wrote, so its paths are only read (`tokenizer_path` would train a missing embedded
  tokenizer into the configured cache directory).
  """
  if data.tokenizer:
    return tokenizer_path(data)  # checks that the file exists, writes nothing
  default = next((s for s in data.sources if s.kind == "default"), None)
  path = embedded_model_path(data, default) if default is not None else ""
  if not path or not os.path.exists(path):
    raise exit_codes.UserError(
        f"the run's tokenizer is not in the data cache ({path or data.resolved_cache_dir}); "
        "sample, export and evaluate never train one: prepare the data on this machine first "
        "(run the training command or rg-prepare-data with the workdir's config), or set "
        "data.tokenizer.")
  return path
