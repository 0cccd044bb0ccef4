"""Pretraining data: seqio tasks over the embedded corpus, TFDS and files; packed, deterministic.

Usage by the training loop:

  pipeline = data.make_pipeline(exp.data)        # prepares (once) and memory-maps the stores
  local = pipeline.batch(step)                    # this process's rows of the global batch
  arrays = data.global_batch(pipeline, step, sharding)   # or: global jax arrays directly
  for eval_local in pipeline.eval_batches(): ...
  pipeline.vocab.encode("text"), pipeline.vocab.decode(ids)

A batch is a dict of numpy arrays [B_local, T]: `inputs, targets, segment_ids, positions` (int32)
and `loss_weights` (float32). The global batch at step k depends only on (config.data, seed, k).
See docs/data.md for the design.
"""

from recurrentgemma_tpu.data.config import DataConfig, SourceConfig, data_config_from
from recurrentgemma_tpu.data.corpus import CorpusError
from recurrentgemma_tpu.data.pipeline import Batch, Pipeline, derive_features, make_pipeline
from recurrentgemma_tpu.data.reader import ReadError
from recurrentgemma_tpu.data.store import StoreError, check as check_store
from recurrentgemma_tpu.data.vocab import TokenizerError, Vocabulary

__all__ = [
    "Batch", "CorpusError", "DataConfig", "Pipeline", "ReadError", "SourceConfig", "StoreError",
    "TokenizerError", "Vocabulary", "check_store", "data_config_from", "derive_features",
    "global_batch", "make_pipeline", "process_rows", "to_global_arrays",
]

_DEVICE = ("global_batch", "process_rows", "to_global_arrays")


def __getattr__(name: str):
  # device.py imports jax; loaded on first use so the data package (the store check that
  # launch/ calls before any pod exists) stays jax-free.
  if name in _DEVICE:
    from recurrentgemma_tpu.data import device  # pylint: disable=g-import-not-at-top
    return getattr(device, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
