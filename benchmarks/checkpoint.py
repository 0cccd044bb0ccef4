r"""Cost of the per-array checksums on checkpoint save and restore (recurrentgemma_tpu/checkpoints).

  python benchmarks/checkpoint.py [--megabytes=64,256] [--repeats=3]

Saves and restores a parameter-like state (bf16-free float32 arrays of a few shapes, plus an Adam-like
state of twice the size) with `CheckpointManager(checksums=True)` and `(checksums=False)`, synchronously,
and prints the best wall time of each. Run on an idle machine for meaningful numbers.
"""

import argparse
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from recurrentgemma_tpu.checkpoints import manager as ckpt


def _state(megabytes: int):
  n = megabytes * 2**20 // 4 // 3  # params: a third of the bytes; the moments: two thirds
  rows = max(n // 1024, 1)
  rng = np.random.default_rng(0)
  params = {f"w{i}": jnp.asarray(rng.standard_normal((rows // 4, 1024), np.float32)) for i in range(4)}
  state = {"mu": jax.tree.map(jnp.copy, params), "nu": jax.tree.map(jnp.copy, params),
           "step": jnp.asarray(7, jnp.int32)}
  return params, state


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def measure(megabytes: int, checksums: bool, repeats: int) -> tuple[float, float]:
  params, state = _state(megabytes)
  best_save, best_restore = float("inf"), float("inf")
  for r in range(repeats + 1):  # the first round compiles the checksum function: not counted
    root = tempfile.mkdtemp()
    options = ckpt.CheckpointOptions(save_every=1, keep_last=2, keep_every=0, async_save=False)
    m = ckpt.CheckpointManager(os.path.join(root, "ck"), options, checksums=checksums)
    t = time.perf_counter()
    m.save(1, params, state, {})
    m.wait_until_finished()
    save = time.perf_counter() - t
    t = time.perf_counter()
    out = m.restore(1, _abstract(params), _abstract(state))
    jax.block_until_ready(out.params)
    restore = time.perf_counter() - t
    m.close()
    shutil.rmtree(root)
    if r:
      best_save, best_restore = min(best_save, save), min(best_restore, restore)
  return best_save, best_restore


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--megabytes", default="64,256")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}")
  print("| state MB | save (no checksums) | save (checksums) | restore (no checksums) | restore (checksums) |")
  print("| ---: | ---: | ---: | ---: | ---: |")
  for mb in (int(x) for x in args.megabytes.split(",")):
    s0, r0 = measure(mb, False, args.repeats)
    s1, r1 = measure(mb, True, args.repeats)
    print(f"| {mb} | {s0:.2f} s | {s1:.2f} s (+{100 * (s1 - s0) / s0:.0f}%) | {r0:.2f} s | "
          f"{r1:.2f} s (+{100 * (r1 - r0) / r0:.0f}%) |")


if __name__ == "__main__":
  main()
