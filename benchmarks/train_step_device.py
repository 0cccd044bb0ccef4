"""Train-step throughput (loss + grad + AdamW) of a ladder point on this host's first device.

    python benchmarks/train_step_device.py --point=griffin,100m --batch=32 --seq_len=2048
    python benchmarks/train_step_device.py --point=hawk,400m --batch=16 --peak_tflops=989

Needs only jax, flax, optax and ml_collections (no data pipeline, no TensorFlow), so it runs on a
bare accelerator host: the batch is random tokens in one document per row, which costs the model
the same FLOPs as real packed text. Prints step time, tokens/s and MFU against the FLOP model of
`recurrentgemma_tpu.model.flops` and the given (or chip-table) peak.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import ladder  # pylint: disable=wrong-import-position
from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=wrong-import-position
from recurrentgemma_tpu import step_functions  # pylint: disable=wrong-import-position
from recurrentgemma_tpu.model import flops as flops_lib  # pylint: disable=wrong-import-position


def random_batch(batch: int, seq_len: int, vocab: int, sharding) -> dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, vocab, size=(batch, seq_len + 1), dtype=np.int32)
  host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((batch, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
          "loss_weights": np.ones((batch, seq_len), np.float32)}
  return {k: jax.device_put(v, sharding[k]) for k, v in host.items()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--point", default="griffin,100m", help="ladder point FAMILY,SIZE (configs/ladder.py)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--steps", type=int, default=10, help="timed steps after two warm-up steps")
  p.add_argument("--scan_impl", default="auto")
  p.add_argument("--remat", default=None, help="override model.remat (none|block|...)")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="dense bf16 peak of one device, TFLOP/s (0: report no MFU)")
  args = p.parse_args()

  config = ladder.get_config(args.point)
  config.model.scan_impl = args.scan_impl
  if args.remat is not None:
    config.model.remat = args.remat
  exp = experiment_lib.build(config, num_devices=1)
  model_config, opt_config = exp.model, exp.optimizer
  device = jax.devices()[0]
  mesh = jax.sharding.Mesh(np.array([device]).reshape(1, 1, 1, 1, 1),
                           ("slice", "data", "fsdp", "seq", "model"))
  fns = step_functions.build_step_functions(model_config, opt_config, mesh, "fsdp")
  state = fns.create_state(jax.random.key(0))
  batch = random_batch(args.batch, args.seq_len, model_config.vocab_size, fns.batch_shardings)

  t = time.perf_counter()
  state, metrics = fns.train_step(state, batch)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t
  state, metrics = fns.train_step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    state, metrics = fns.train_step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  tokens_per_s = args.batch * args.seq_len / step_s
  flops_per_token = flops_lib.training_flops_per_token(model_config, args.seq_len)
  total, non_embedding = flops_lib.param_counts(model_config)
  mfu = tokens_per_s * flops_per_token / (args.peak_tflops * 1e12) if args.peak_tflops else float("nan")
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(f"model: {args.point} ({total / 1e6:.1f}M params, {non_embedding / 1e6:.1f}M non-embedding), "
        f"dtype {model_config.dtype}, remat {model_config.remat}, scan_impl {args.scan_impl}")
  print("| batch x T | first step (compile) s | step s (median of %d) | tokens/s | train FLOPs/token | MFU |"
        % args.steps)
  print("| --- | --- | --- | --- | --- | --- |")
  print(f"| {args.batch} x {args.seq_len} | {first:.1f} | {step_s * 1e3:.1f} ms | {tokens_per_s:,.0f} | "
        f"{flops_per_token / 1e9:.3f} G | {mfu:.1%} |")
  print(f"loss after {args.steps + 2} steps on random tokens: {float(metrics['loss']):.3f}")


if __name__ == "__main__":
  main()
