"""Data pipeline: preparation (in process and on Beam), batches, and reads from object storage.

  JAX_PLATFORMS=cpu python benchmarks/data.py [--config=configs/tiny.py] [--cache_dir=DIR]
      [--parts=local,beam,gcs,train] [--max_documents=0] [--beam_workers=1,2]
      [--latencies_ms=0,50,200] [--train_steps=60]

Prints one JSON object per part:
- local: tokenizer training, in-process preparation and steady-state batch tokens/s (local disk),
  numpy rows and global jax arrays.
- beam: preparation tokens/s on the Beam DirectRunner (multi-processing) with each worker count,
  and per worker; the config's default source is cut into 2 x workers shards.
- gcs: per-process reads from fake-gcs-server (the real client), through a proxy adding 0/50/200
  ms per request: rows/s and step latency of one host of the Griffin-14B v5p-256 plan (global
  batch 1,024 rows of 2,048 tokens over 32 hosts: 32 rows per step), without and with prefetch,
  against what that plan needs (~7 rows per host per second at its predicted 4.76 s per step).
- train: the data-wait share of step time in a real training run (configs/tiny.py's model) that
  reads its store through the emulator, at each added latency.
Timings on a shared machine: record `uptime` with them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The 14B plan (docs/benchmarks.md, sharding planner): 1,024 rows of 2,048 tokens per step over 32
# hosts, 4.76 s predicted per step.
PLAN_ROWS_PER_STEP, PLAN_HOSTS, PLAN_STEP_S, PLAN_SEQ = 1024, 32, 4.76, 2048


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _tokens(pipeline) -> int:
  return sum(sum(s.count("tokens").values()) for s in pipeline.stores)


def bench_local(config, cache_dir: str, steps: int) -> dict:
  from recurrentgemma_tpu import data
  from recurrentgemma_tpu.data import vocab as vocab_lib

  config.data.cache_dir = cache_dir
  cfg = data.data_config_from(config)
  out: dict = {"part": "local", "seq_len": cfg.seq_len, "vocab_size": cfg.vocab_size}
  t = time.perf_counter()
  vocab_lib.tokenizer_path(cfg)
  out["tokenizer_seconds"] = round(time.perf_counter() - t, 2)
  t = time.perf_counter()
  pipeline = data.make_pipeline(cfg, process_index=0, process_count=1)
  prepare = time.perf_counter() - t
  out.update(prepare_seconds=round(prepare, 2), stored_tokens=_tokens(pipeline),
             prepare_tokens_per_s=round(_tokens(pipeline) / prepare))
  ks = np.random.default_rng(0).integers(0, 100 * pipeline.num_train_rows, steps)
  ks //= cfg.global_batch_size
  pipeline.batch(0)
  t = time.perf_counter()
  for k in ks:
    pipeline.batch(int(k))
  tokens = cfg.global_batch_size * cfg.seq_len
  out["batch_tokens_per_s"] = round(tokens * steps / (time.perf_counter() - t))
  import jax  # pylint: disable=import-outside-toplevel

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  jax.block_until_ready(data.global_batch(pipeline, 0, sharding))
  t = time.perf_counter()
  for k in ks[:500]:
    jax.block_until_ready(data.global_batch(pipeline, int(k), sharding))
  out["global_batch_tokens_per_s"] = round(tokens * min(500, steps) / (time.perf_counter() - t))
  return out


def bench_beam(config, cache_dir: str, workers_list: list[int]) -> dict:
  from recurrentgemma_tpu import data
  from recurrentgemma_tpu.data import prepare, vocab as vocab_lib

  out: dict = {"part": "beam", "runs": []}
  config.data.cache_dir = cache_dir
  vocab_lib.tokenizer_path(data.data_config_from(config))  # trained once, outside the timings
  for workers in workers_list:
    with tempfile.TemporaryDirectory() as tmp:
      config.data.store = tmp
      config.data.sources.default.num_shards = 2 * max(workers_list)
      cfg = data.data_config_from(config)
      t = time.perf_counter()
      pipeline = prepare.prepare(cfg, runner="DirectRunner", num_workers=workers)
      seconds = time.perf_counter() - t
      out["runs"].append({"workers": workers, "shards": cfg.sources[0].num_shards,
                          "seconds": round(seconds, 1), "tokens": _tokens(pipeline),
                          "tokens_per_s": round(_tokens(pipeline) / seconds),
                          "tokens_per_s_per_worker": round(_tokens(pipeline) / seconds / workers)})
  config.data.store = ""
  return out


def _gcs_store(config, cache_dir: str, bucket: str) -> str:
  """Prepares the config's store at seq_len 2,048 into the bucket; returns the store root."""
  from recurrentgemma_tpu import data
  from recurrentgemma_tpu.data import prepare

  config.data.cache_dir = cache_dir
  config.data.seq_len = PLAN_SEQ
  config.data.store = f"gs://{bucket}/stores"
  prepare.prepare(data.data_config_from(config))
  return config.data.store


def bench_gcs(config, emulator: str, latencies_ms: list[int], steps: int) -> dict:
  """One host of the 14B plan: process 0 of 32, 32 rows of 2,048 tokens per step."""
  from recurrentgemma_tpu import data
  import gcs_emulator  # tests/gcs_emulator.py

  need = PLAN_ROWS_PER_STEP / PLAN_HOSTS / PLAN_STEP_S
  out: dict = {"part": "gcs", "rows_per_step": PLAN_ROWS_PER_STEP // PLAN_HOSTS,
               "need_rows_per_s": round(need, 2), "runs": []}
  config.data.global_batch_size = config.data.eval_batch_size = PLAN_ROWS_PER_STEP
  for ms in latencies_ms:
    proxy = gcs_emulator.Proxy(emulator, latency_s=ms / 1000)
    os.environ["STORAGE_EMULATOR_HOST"] = proxy.address
    try:
      run = {"latency_ms": ms}
      for prefetch in (0, 8):
        config.data.prefetch_steps = prefetch
        cfg = data.data_config_from(config)
        pipeline = data.make_pipeline(cfg, process_index=0, process_count=PLAN_HOSTS)
        requests = proxy.range_reads
        lat = []
        t0 = time.perf_counter()
        for k in range(steps):
          t = time.perf_counter()
          pipeline.batch(k)
          lat.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
        pipeline.close()
        rows = steps * cfg.global_batch_size // PLAN_HOSTS
        key = "prefetch8" if prefetch else "no_prefetch"
        run[key] = {"rows_per_s": round(rows / total, 1),
                    "step_p50_ms": round(1000 * float(np.median(lat)), 1),
                    "step_p95_ms": round(1000 * float(np.percentile(lat, 95)), 1),
                    "range_reads_per_step": round((proxy.range_reads - requests) / steps, 1),
                    "x_need": round(rows / total / need, 1)}
      out["runs"].append(run)
    finally:
      proxy.close()
      os.environ["STORAGE_EMULATOR_HOST"] = emulator
  return out


def bench_train(emulator: str, store_root: str, cache_dir: str, latencies_ms: list[int],
                steps: int, batch: int) -> dict:
  """The tiny model trained for `steps` steps reading the gs:// store through the proxy."""
  from recurrentgemma_tpu import experiment as experiment_lib, trainer as trainer_lib
  import gcs_emulator

  out: dict = {"part": "train", "steps": steps, "rows_per_step": batch, "seq_len": PLAN_SEQ,
               "runs": []}
  for ms in latencies_ms:
    proxy = gcs_emulator.Proxy(emulator, latency_s=ms / 1000)
    os.environ["STORAGE_EMULATOR_HOST"] = proxy.address
    try:
      with tempfile.TemporaryDirectory() as workdir:
        config = experiment_lib.load_config(os.path.join(REPO, "configs/tiny.py"), [
            f"data.store={store_root}", f"data.cache_dir={cache_dir}", f"data.seq_len={PLAN_SEQ}",
            f"data.global_batch_size={batch}", f"data.eval_batch_size={batch}",
            f"train.steps={steps}", "train.eval_every=0",
            "data.num_eval_batches=1", "checkpoint.save_every=100000", "train.log_every=10"])
        exp = experiment_lib.build(config)
        t = trainer_lib.Trainer(exp, trainer_lib.prepare_workdir(workdir))
        t.run()
        pf = t.pipeline.prefetcher
        waits = pf.waits[1:]  # the first step's data is read while it compiles anyway
        span = pf.last_get - pf.first_get
        out["runs"].append({"latency_ms": ms, "step_s": round(span / (len(pf.waits) - 1), 3),
                            "data_wait_share": round(sum(waits) / span, 4),
                            "max_wait_ms": round(1000 * max(waits), 1),
                            "steps_that_waited_over_1ms": sum(w > 1e-3 for w in waits)})
    finally:
      proxy.close()
      os.environ["STORAGE_EMULATOR_HOST"] = emulator
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--cache_dir", default="", help="data cache; empty = a fresh temporary one")
  parser.add_argument("--parts", default="local,beam,gcs,train")
  parser.add_argument("--steps", type=int, default=200, help="batches timed (local, gcs)")
  parser.add_argument("--max_documents", type=int, default=0, help="cap per split (0 = all)")
  parser.add_argument("--beam_workers", default="1,2")
  parser.add_argument("--latencies_ms", default="0,50,200")
  parser.add_argument("--train_steps", type=int, default=20)
  parser.add_argument("--train_batch", type=int, default=2, help="rows per step (T=2,048)")
  args = parser.parse_args()
  sys.path.insert(0, REPO)
  sys.path.insert(0, os.path.join(REPO, "tests"))
  parts = args.parts.split(",")
  latencies = [int(x) for x in args.latencies_ms.split(",")]

  tmp = tempfile.TemporaryDirectory()
  cache = args.cache_dir or tmp.name

  def config():
    c = _load_config(args.config)
    c.data.sources.default.max_documents = args.max_documents
    return c

  load = lambda: os.getloadavg()[0]  # noqa: E731
  machine = f"{os.cpu_count()} CPU cores"
  if "local" in parts:
    print(json.dumps({**bench_local(config(), cache, args.steps), "machine": machine,
                      "load": load()}), flush=True)
  if "beam" in parts:
    print(json.dumps({**bench_beam(config(), cache, [int(w) for w in args.beam_workers.split(",")]),
                      "machine": machine, "load": load()}), flush=True)
  if "gcs" in parts or "train" in parts:
    import gcs_emulator

    with gcs_emulator.emulator("bench") as host:
      root = _gcs_store(config(), cache, "bench")
      if "gcs" in parts:
        c = config()
        c.data.cache_dir, c.data.seq_len, c.data.store = cache, PLAN_SEQ, root
        print(json.dumps({**bench_gcs(c, host, latencies, args.steps), "machine": machine,
                          "load": load()}), flush=True)
      if "train" in parts:
        print(json.dumps({**bench_train(host, root, cache, latencies, args.train_steps,
                                      args.train_batch),
                          "machine": machine, "load": load()}), flush=True)
  tmp.cleanup()


if __name__ == "__main__":
  main()
