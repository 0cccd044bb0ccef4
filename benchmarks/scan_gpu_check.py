"""The Pallas GPU (Triton) scan compiled for real on a GPU, values and gradients against float64.

    python benchmarks/scan_gpu_check.py        # on a CUDA host; exit 1 on any mismatch
    JAX_PLATFORMS=cpu python benchmarks/scan_gpu_check.py   # the same checks, Pallas interpret mode

Shapes that are not multiples of the channel block or the time chunk, forward and reverse, with
and without h0, float32 and bfloat16, several block sizes, chunked and single-chunk; y, h_last, dx, da and dh0 against
`reference.numpy_linear_scan(_vjp)` in float64 on the same (rounded) inputs, max error relative to
the largest reference value. Also reports whether `impl="auto"` lowered to a Triton call.
"""

import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pallas_kernels  # pylint: disable=wrong-import-position
from pallas_kernels import gpu, reference  # pylint: disable=wrong-import-position


def check(shape, dtype, reverse, with_h0, blocks, interpret: bool) -> bool:
  """Compiles one case and prints its errors; True when every output is within tolerance."""
  rng = np.random.default_rng(1)
  x64 = rng.normal(size=shape); a64 = rng.uniform(0.5, 1.0, size=shape)
  h064 = rng.normal(size=(shape[0], shape[2])) if with_h0 else None
  dy64 = rng.normal(size=shape); dh64 = rng.normal(size=(shape[0], shape[2]))
  x, a = jnp.asarray(x64, dtype), jnp.asarray(a64, dtype)
  h0 = None if h064 is None else jnp.asarray(h064, jnp.float32)
  # The float64 reference sees exactly the (rounded) inputs the kernel sees.
  xr, ar = np.asarray(x, np.float64), np.asarray(a, np.float64)
  h0r = None if h0 is None else np.asarray(h0, np.float64)
  y_ref, hl_ref = reference.numpy_linear_scan(xr, ar, h0r, reverse=reverse)
  dyr = np.asarray(jnp.asarray(dy64, dtype), np.float64)
  grads_ref = reference.numpy_linear_scan_vjp(xr, ar, h0r if h0r is not None else np.zeros((shape[0], shape[2])),
                                              dyr, dh64, reverse=reverse)
  def f(x, a, h0):
    return gpu.linear_scan(x, a, h0, reverse=reverse, block_sizes=blocks, interpret=interpret)
  h0_arg = h0 if h0 is not None else jnp.zeros((shape[0], shape[2]), jnp.float32)
  t = time.perf_counter()
  fj = jax.jit(f)
  text = fj.lower(x, a, h0_arg).compile().as_text()
  compile_s = time.perf_counter() - t
  y, hl = fj(x, a, h0_arg)
  _, vjp = jax.vjp(f, x, a, h0_arg)
  dx, da, dh0 = vjp((jnp.asarray(dy64, dtype), jnp.asarray(dh64, jnp.float32)))
  tol = 2e-5 if dtype == jnp.float32 else 1e-2
  def err(got, want):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
  errs = dict(y=err(y, y_ref), h_last=err(hl, hl_ref), dx=err(dx, grads_ref[0]), da=err(da, grads_ref[1]),
              dh0=err(dh0, grads_ref[2]))
  ok = all(v <= tol for v in errs.values())
  triton = text.count("triton")
  print(f"{'OK  ' if ok else 'FAIL'} shape={shape} {jnp.dtype(dtype).name} reverse={reverse} h0={with_h0} "
        f"{gpu.plan(shape, blocks)} compile {compile_s:.1f}s triton-calls-in-hlo={triton} max rel err "
        + " ".join(f"{k}={v:.2e}" for k, v in errs.items()) + f" (tol {tol:g})", flush=True)
  return ok


def main() -> int:
  device = jax.devices()[0]
  print(f"jax {jax.__version__}, {jax.device_count()} x {device.device_kind} ({device.platform})", flush=True)
  interpret = device.platform == "cpu"
  B = gpu.BlockSizes
  SINGLE = B(channels=32, chunk=65536, unroll=16, num_warps=1, prefetch=True)  # pylint: disable=invalid-name
  # Default blocks chunk time automatically at these shapes; B(chunk=1024) is a single chunk.
  cases = [((3, 1000, 300), jnp.float32, False, True, B()),
           ((3, 1000, 300), jnp.float32, True, False, B(channels=64)),
           ((3, 1000, 300), jnp.float32, True, True, B(chunk=1024)),
           ((2, 517, 1030), jnp.bfloat16, False, True, B()),
           ((2, 517, 1030), jnp.bfloat16, True, True, B(channels=32, num_warps=1)),
           ((2, 517, 1030), jnp.float32, False, False, B(channels=128, chunk=64, unroll=16)),
           # Single pass, one warp, register prefetch: masked (odd C, partial last iteration) and aligned.
           ((3, 1000, 300), jnp.float32, True, True, SINGLE),
           ((2, 512, 1024), jnp.bfloat16, False, True, SINGLE),
           ((2, 512, 1024), jnp.float32, True, False, B(channels=16, chunk=65536, unroll=32,
                                                        num_warps=1, prefetch=True))]
  if interpret:  # the interpreter is slow: small shapes, chunks forced small to cover the chunked path
    small = [B(channels=16, chunk=8, unroll=4), B(channels=16, chunk=12, unroll=4), B(channels=16),
             B(channels=16, chunk=8, unroll=4), B(channels=32, chunk=6, unroll=2),
             B(channels=16, chunk=16, unroll=16), B(channels=16, chunk=64, unroll=8, prefetch=True),
             B(channels=64, chunk=64, unroll=4, prefetch=True), B(channels=16, chunk=64, unroll=16, prefetch=True)]
    cases = [((2, 37, 45), d, r, h, blk) for (_, d, r, h, _), blk in zip(cases, small)]
  failures = 0
  for case in cases:
    try:
      failures += not check(*case, interpret=interpret)
    except Exception:  # pylint: disable=broad-except
      failures += 1
      print(f"FAIL {case}:", flush=True)
      traceback.print_exc()
  try:
    x = jnp.ones((2, 64, 128), jnp.float32)
    text = jax.jit(lambda x: pallas_kernels.linear_scan(x, x * 0.5)).lower(x).compile().as_text()
    print(f"impl=auto on {device.platform}: Triton call in the compiled HLO: {'triton' in text}", flush=True)
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
  print(f"numerics failures: {failures}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
