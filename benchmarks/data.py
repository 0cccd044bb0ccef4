"""Data pipeline throughput: one-time preparation and steady-state batches, in tokens/s.

  JAX_PLATFORMS=cpu python benchmarks/data.py --config=configs/tiny.py [--cache_dir=DIR]

With no --cache_dir a fresh temporary cache is used, so the tokenizer training and the store
preparation are measured too; with an existing cache only the batch path is. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time

import numpy as np


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--cache_dir", default="", help="data cache; empty = a fresh temporary one")
  parser.add_argument("--steps", type=int, default=2000, help="batches timed")
  args = parser.parse_args()

  import jax

  from recurrentgemma_tpu import data
  from recurrentgemma_tpu.data import vocab as vocab_lib

  config = _load_config(args.config)
  tmp = None
  if not args.cache_dir:
    tmp = tempfile.TemporaryDirectory()
    args.cache_dir = tmp.name
  config.data.cache_dir = args.cache_dir
  cfg = data.data_config_from(config)

  result: dict = {"config": args.config, "device": f"{os.cpu_count()} CPU cores",
                  "seq_len": cfg.seq_len, "global_batch_size": cfg.global_batch_size,
                  "vocab_size": cfg.vocab_size}
  t = time.perf_counter()
  vocab_lib.tokenizer_path(cfg)
  result["tokenizer_seconds"] = round(time.perf_counter() - t, 2)
  t = time.perf_counter()
  pipeline = data.make_pipeline(cfg, process_index=0, process_count=1)
  prepare = time.perf_counter() - t
  stored = sum(sum(s.count("tokens").values()) for s in pipeline.stores)
  result.update(prepare_seconds=round(prepare, 2), stored_tokens=stored,
                prepare_tokens_per_s=round(stored / prepare),
                train_rows=pipeline.num_train_rows,
                fill=round(stored / ((pipeline.num_train_rows + pipeline.num_eval_rows)
                                     * cfg.seq_len), 4))

  tokens = cfg.global_batch_size * cfg.seq_len
  # Steps spread over many epochs, so reads are not served from a warm, sequential window only.
  steps = np.random.default_rng(0).integers(0, 100 * pipeline.num_train_rows, args.steps)
  steps //= cfg.global_batch_size
  pipeline.batch(0)
  t = time.perf_counter()
  for k in steps:
    pipeline.batch(int(k))
  result["batch_tokens_per_s"] = round(tokens * len(steps) / (time.perf_counter() - t))

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  jax.block_until_ready(data.global_batch(pipeline, 0, sharding))
  t = time.perf_counter()
  for k in steps[:500]:
    jax.block_until_ready(data.global_batch(pipeline, int(k), sharding))
  result["global_batch_tokens_per_s"] = round(tokens * min(500, len(steps))
                                              / (time.perf_counter() - t))
  result["jax_devices"] = jax.device_count()
  print(json.dumps(result))
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  main()
