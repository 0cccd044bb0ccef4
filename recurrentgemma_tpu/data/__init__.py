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
from recurrentgemma_tpu.data.device import global_batch, process_rows, to_global_arrays
from recurrentgemma_tpu.data.pipeline import Batch, Pipeline, derive_features, make_pipeline
from recurrentgemma_tpu.data.vocab import TokenizerError, Vocabulary

__all__ = [
    "Batch", "CorpusError", "DataConfig", "Pipeline", "SourceConfig", "TokenizerError",
    "Vocabulary", "data_config_from", "derive_features", "global_batch", "make_pipeline",
    "process_rows", "to_global_arrays",
]
