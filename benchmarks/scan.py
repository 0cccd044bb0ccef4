"""Linear-scan throughput per implementation, shape and dtype, against measured copy bandwidth.

    JAX_PLATFORMS=cpu python benchmarks/scan.py            # CPU: the XLA implementations
    python benchmarks/scan.py --impls=pallas_tpu,xla_linear  # on a TPU / GPU host
    python benchmarks/scan.py --impls=pallas_gpu,pallas_gpu/c128,pallas_gpu/u16,xla_associative  # GPU sweep

For each case it prints the median time (per call, calls issued back to back; see _time) of the forward pass and of forward+backward (jax.grad),
the bytes the pass must move at minimum (forward: x and a read, y written; backward: dy, a, y read,
dx and da written; h0 / h_last are negligible), the achieved GB/s, and that as a fraction of the
device's memory-copy bandwidth measured here (a jitted x * 1 + 0 style elementwise copy, read +
write). Pallas kernels in interpret mode are not timed: the interpreter is a correctness tool.
"""

import argparse
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels

DEFAULT_SHAPES = ("4x1024x512", "8x2048x1024", "2x4096x2560")


def _time(fn: Callable, *args, repeats: int) -> float:
  """Median seconds per call. Each sample runs enough back-to-back calls to last ~2 ms (at most 50)
  and waits once, so host dispatch overlaps the device work (a training step issues the scan among
  many other ops; a lone blocking call would time the launch latency of sub-millisecond kernels)."""
  jax.block_until_ready(fn(*args))  # compile and warm up
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  number = int(min(50, max(1, 2e-3 / max(time.perf_counter() - start, 1e-9))))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(number):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / number)
  return statistics.median(times)


def copy_bandwidth(num_bytes: int = 256 << 20, repeats: int = 10) -> float:
  """Measured bytes/s of an elementwise float32 copy (counting read + write)."""
  x = jnp.arange(num_bytes // 4, dtype=jnp.float32)
  # A negation cannot be elided and moves exactly one read and one write per element.
  seconds = _time(jax.jit(jnp.negative), x, repeats=repeats)
  return 2 * num_bytes / seconds


def gpu_blocks(spec: str):
  """gpu.BlockSizes from `c<N>/l<N>/u<N>/w<N>/s<N>/p<0|1>` (any subset; the rest default)."""
  from pallas_kernels import gpu  # pylint: disable=g-import-not-at-top
  names = {"c": "channels", "l": "chunk", "u": "unroll", "w": "num_warps", "s": "num_stages",
           "p": "prefetch"}
  fields = {}
  for part in spec.split("/") if spec else ():
    if part[:1] not in names or not part[1:].isdigit():
      raise SystemExit(f"{spec!r}: {part!r} is not one of c<N>, l<N>, u<N>, w<N>, s<N>, p<0|1>")
    fields[names[part[0]]] = bool(int(part[1:])) if part[0] == "p" else int(part[1:])
  return gpu.BlockSizes(**fields)


def scan_fn(impl: str) -> Callable:
  """`impl` is a `linear_scan` impl, or `pallas_gpu/<fields>`: the GPU kernel with gpu.BlockSizes
  fields overridden, e.g. `pallas_gpu/c128` (channels), `/l256` (chunk), `/u16` (unroll), `/w8`
  (num_warps), `/s3` (num_stages), `/p0` (prefetch off), combinable: `pallas_gpu/c128/l256/u16/w4`."""
  if impl.startswith("pallas_gpu/"):
    blocks = gpu_blocks(impl.split("/", 1)[1])
    from pallas_kernels import gpu  # pylint: disable=g-import-not-at-top
    return lambda x, a: gpu.linear_scan(x, a, block_sizes=blocks)
  return lambda x, a: pallas_kernels.linear_scan(x, a, impl=impl)


def run_case(impl: str, shape: tuple[int, int, int], dtype, repeats: int):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), dtype)
  a = jnp.asarray(rng.uniform(0.6, 1.0, size=shape), dtype)
  scan = scan_fn(impl)
  fwd = jax.jit(scan)
  grad = jax.jit(jax.grad(lambda x, a: jnp.sum(scan(x, a)[0].astype(jnp.float32)), (0, 1)))
  array_bytes = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
  t_fwd = _time(fwd, x, a, repeats=repeats)
  t_grad = _time(grad, x, a, repeats=repeats)
  return t_fwd, 3 * array_bytes, t_grad, (3 + 5) * array_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--impls", default="xla_linear,xla_associative,auto",
                      help="linear_scan impls, and pallas_gpu/<fields>: the GPU kernel with other "
                           "BlockSizes (see scan_fn)")
  parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="BxTxC,...")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  for impl in args.impls.split(","):
    if impl not in pallas_kernels.IMPLS and not impl.startswith("pallas_gpu/"):
      raise SystemExit(f"--impls: {impl!r} is not one of {pallas_kernels.IMPLS}")
  device = jax.devices()[0]
  bandwidth = copy_bandwidth()
  print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}, jax {jax.__version__}")
  print(f"measured copy bandwidth: {bandwidth / 1e9:.2f} GB/s")
  header = (f"{'impl':<16} {'shape':<14} {'dtype':<9} {'fwd ms':>9} {'fwd GB/s':>9} {'of copy':>8} "
            f"{'f+b ms':>9} {'f+b GB/s':>9} {'of copy':>8}")
  print(header)
  for shape_text in args.shapes.split(","):
    shape = tuple(int(v) for v in shape_text.split("x"))
    if len(shape) != 3:
      raise SystemExit(f"--shapes: {shape_text!r} is not BxTxC")
    for dtype_name in args.dtypes.split(","):
      dtype = jnp.dtype(dtype_name)
      for impl in args.impls.split(","):
        t_f, b_f, t_g, b_g = run_case(impl, shape, dtype, args.repeats)
        print(f"{impl:<16} {shape_text:<14} {dtype_name:<9} {t_f * 1e3:9.2f} {b_f / t_f / 1e9:9.2f} "
              f"{b_f / t_f / bandwidth:8.1%} {t_g * 1e3:9.2f} {b_g / t_g / 1e9:9.2f} "
              f"{b_g / t_g / bandwidth:8.1%}", flush=True)


if __name__ == "__main__":
  main()
