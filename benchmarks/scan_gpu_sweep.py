"""Sweep of the Pallas GPU scan's BlockSizes: numerics against float64, then forward/backward timing.

    python benchmarks/scan_gpu_sweep.py --out=DIR                 # on a CUDA host (one short lease)
    JAX_PLATFORMS=cpu python benchmarks/scan_gpu_sweep.py --lower_only    # CPU: each variant lowers to Triton IR
    JAX_PLATFORMS=cpu python benchmarks/scan_gpu_sweep.py --interpret --shapes=2x40x96 --dtypes=float32

For every variant (a `benchmarks/scan.py` BlockSizes spec, e.g. `c32/u16/w1/p1`; `l65536` forces a
single pass) and every shape and dtype it compiles the forward kernel and the backward kernel on
their own (compiles run in a thread pool; one Triton failure costs only its own rows), checks y,
h_last, dx, da and dh0 against `reference.numpy_linear_scan(_vjp)` in float64 on the same rounded
inputs (max error relative to the largest reference value), and times each kernel as
`benchmarks/scan.py` does (calls back to back, median of samples). Bytes per kernel at minimum:
forward 3 arrays (x, a read; y written), backward 5 (dy, a, y read; dx, da written). A variant that
fails numerics is reported and never ranked. Then, for the best variant per case, the default
BlockSizes, xla_associative and xla_linear, it runs `benchmarks/scan.py`'s forward and
`jax.grad` measurement, whose fwd+bwd time also holds the loss's own passes (the sum over y and the
broadcast cotangent). Every stage checks the wall-clock budget first, so the run ends inside it.
"""

import argparse
import concurrent.futures
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scan as scan_bench  # pylint: disable=wrong-import-position  # benchmarks/scan.py
from pallas_kernels import gpu, reference  # pylint: disable=wrong-import-position

SINGLE = "l65536"  # a chunk longer than any sequence here: one pass
# Ordered by expected value: if the budget runs out, the tail is what is lost.
VARIANTS = (
    # The previous default (chunked two-pass, 256 channels, 4 warps), for comparison.
    "c256/u8/w4/p0",
    # Single pass, one warp: channels per program x steps per iteration, register prefetch.
    *(f"c{c}/u{u}/w1/p1/{SINGLE}" for c, u in ((32, 16), (32, 32), (16, 16), (16, 32), (64, 16),
                                                (32, 8), (64, 32))),
    f"c32/u16/w1/p0/{SINGLE}", f"c32/u32/w1/p0/{SINGLE}",  # no prefetch
    f"c32/u16/w1/p0/s3/{SINGLE}",  # Triton software pipelining instead
    f"c64/u16/w2/p1/{SINGLE}",  # two warps per program
    f"c16/u64/w1/p1/{SINGLE}",  # very deep (bf16 rows are short)
    # Two-pass with short chunks: more programs, 5/3 the bytes.
    "c32/u16/w1/p1/l512", "c64/u16/w1/p1/l512",
)
TOLERANCE = {"float32": 2e-5, "bfloat16": 1e-2}


def log(msg: str, out=None) -> None:
  print(msg, flush=True)
  if out:
    with open(os.path.join(out, "sweep.log"), "a") as f:
      f.write(msg + "\n")


class Case:
  """One shape and dtype: inputs on the device and float64 reference outputs (as float32 there)."""

  def __init__(self, shape, dtype_name: str):
    self.shape, self.dtype_name, self.dtype = shape, dtype_name, jnp.dtype(dtype_name)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), self.dtype)
    a = jnp.asarray(rng.uniform(0.6, 1.0, size=shape), self.dtype)
    dy = jnp.asarray(rng.normal(size=shape), self.dtype)
    h0 = rng.normal(size=(shape[0], shape[2])).astype(np.float32)
    dh = rng.normal(size=(shape[0], shape[2])).astype(np.float32)
    xr, ar, dyr = (np.asarray(v.astype(jnp.float32), np.float64) for v in (x, a, dy))
    y_ref, hl_ref = reference.numpy_linear_scan(xr, ar, h0.astype(np.float64))
    grads = reference.numpy_linear_scan_vjp(xr, ar, h0.astype(np.float64), dyr, dh.astype(np.float64))
    self.x, self.a, self.dy = x, a, dy
    self.h0, self.dh = jnp.asarray(h0), jnp.asarray(dh)
    self.y = jnp.asarray(y_ref, self.dtype)  # the forward's saved output, as the backward reads it
    self.want = {k: jnp.asarray(v, jnp.float32) for k, v in
                 dict(y=y_ref, h_last=hl_ref, dx=grads[0], da=grads[1], dh0=grads[2]).items()}
    self.array_bytes = int(np.prod(shape)) * self.dtype.itemsize

  @property
  def name(self) -> str:
    return "x".join(map(str, self.shape)) + " " + self.dtype_name

  def fwd_args(self):
    return self.x, self.a, self.h0

  def bwd_args(self):
    return self.dy, self.a, self.y, self.h0, self.dh


@jax.jit
def _rel_err(got, want):
  return jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-30)


def kernel_fns(blocks, interpret: bool):
  """The forward and the backward kernel alone (no custom_vjp plumbing, no loss)."""
  fwd = lambda x, a, h0: gpu._fwd_call(x, a, h0, reverse=False, blocks=blocks, interpret=interpret)  # pylint: disable=protected-access
  bwd = lambda dy, a, y, h0, dh: gpu._bwd_call(dy, a, y, h0, dh, reverse=False, blocks=blocks,  # pylint: disable=protected-access
                                                interpret=interpret)
  return fwd, bwd


def compile_all(jobs, workers: int, lower_only: bool):
  """{key: compiled executable or the error text}; jobs are (key, fn, args)."""

  def one(job):
    key, fn, args = job
    t = time.perf_counter()
    try:
      structs = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in args]
      if lower_only:
        text = jax.jit(fn).trace(*structs).lower(lowering_platforms=("cuda",)).as_text()
        return key, ("lowered" if "triton" in text else "no triton call"), time.perf_counter() - t
      return key, jax.jit(fn).lower(*structs).compile(), time.perf_counter() - t
    except Exception as e:  # pylint: disable=broad-except
      return key, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", time.perf_counter() - t

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return {key: (exe, s) for key, exe, s in pool.map(one, jobs)}


def sweep(cases, variants, args, bandwidth, deadline, results):
  """Compiles and measures every (variant, case); appends dicts to `results`."""
  interpret = args.interpret
  jobs = []
  for spec in variants:
    blocks = scan_bench.gpu_blocks(spec)
    fwd, bwd = kernel_fns(blocks, interpret)
    for case in cases:
      jobs.append(((spec, case.name, "fwd"), fwd, case.fwd_args()))
      jobs.append(((spec, case.name, "bwd"), bwd, case.bwd_args()))
  t = time.perf_counter()
  compiled = compile_all(jobs, args.workers, args.lower_only)
  log(f"compiled {len(jobs)} kernels in {time.perf_counter() - t:.1f}s "
      f"({sum(isinstance(e, str) and e != 'lowered' for e, _ in compiled.values())} failures)", args.out)
  if args.lower_only:
    for key, (exe, s) in compiled.items():
      log(f"{'/'.join(key[:1])} {key[1]} {key[2]}: {exe} ({s:.1f}s)", args.out)
    return
  for spec in variants:
    for case in cases:
      if time.time() > deadline:
        log(f"budget spent: skipping {spec} {case.name}", args.out)
        continue
      row = dict(variant=spec, shape=case.name.split()[0], dtype=case.dtype_name,
                 plan=str(gpu.plan(case.shape, scan_bench.gpu_blocks(spec))))
      for kind, n_arrays, fn_args, outs in (("fwd", 3, case.fwd_args(), ("y", "h_last")),
                                            ("bwd", 5, case.bwd_args(), ("dx", "da", "dh0"))):
        exe, compile_s = compiled[(spec, case.name, kind)]
        row[f"{kind}_compile_s"] = round(compile_s, 2)
        if isinstance(exe, str):
          row[f"{kind}_error"] = exe
          continue
        try:
          got = exe(*fn_args)
          errs = {k: float(_rel_err(g, case.want[k])) for k, g in zip(outs, got)}
          row[f"{kind}_err"] = errs
          row[f"{kind}_ok"] = all(v <= TOLERANCE[case.dtype_name] for v in errs.values())
          if not interpret:
            seconds = scan_bench._time(exe, *fn_args, repeats=args.repeats)  # pylint: disable=protected-access
            row[f"{kind}_ms"] = seconds * 1e3
            row[f"{kind}_of_copy"] = n_arrays * case.array_bytes / seconds / bandwidth
        except Exception as e:  # pylint: disable=broad-except
          row[f"{kind}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      results.append(row)
      log(format_row(row), args.out)


def format_row(r) -> str:
  def part(kind):
    if f"{kind}_error" in r:
      return f"{kind} ERROR {r[f'{kind}_error'][:120]}"
    err = max(r[f"{kind}_err"].values())
    ok = "ok" if r[f"{kind}_ok"] else "NUMERICS FAIL"
    if f"{kind}_ms" not in r:
      return f"{kind} err {err:.1e} {ok}"
    return f"{kind} {r[f'{kind}_ms']:7.3f} ms {r[f'{kind}_of_copy']:6.1%} err {err:.1e} {ok}"
  return f"{r['variant']:<26} {r['shape']:<12} {r['dtype']:<8} {part('fwd')} | {part('bwd')}"


def best(results, shape, dtype, kind):
  rows = [r for r in results if r["shape"] == shape and r["dtype"] == dtype and r.get(f"{kind}_ok")
          and f"{kind}_ms" in r]
  return min(rows, key=lambda r: r[f"{kind}_ms"]) if rows else None


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default="8x2048x1024,2x4096x2560")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--budget_s", type=float, default=330.0, help="wall-clock budget of the whole run")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--workers", type=int, default=12, help="parallel compiles")
  p.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for sweep.log/json")
  p.add_argument("--interpret", action="store_true", help="Pallas interpreter on CPU: numerics only")
  p.add_argument("--lower_only", action="store_true", help="only lower each variant for CUDA (CPU)")
  p.add_argument("--train_step", default="", help="args for train_step_device.py, run at the end")
  args = p.parse_args()
  start = time.time()
  deadline = start + args.budget_s
  device = jax.devices()[0]
  log(f"jax {jax.__version__}, {jax.device_count()} x {device.device_kind} ({device.platform}), "
      f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", args.out)
  on_gpu = device.platform == "gpu"
  bandwidth = scan_bench.copy_bandwidth() if on_gpu else float("nan")
  log(f"measured copy bandwidth: {bandwidth / 1e9:.2f} GB/s", args.out)
  variants = args.variants.split(",")
  shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
  results = []
  for dtype_name in args.dtypes.split(","):
    if time.time() > deadline:
      break
    t = time.perf_counter()
    cases = [Case(shape, dtype_name) for shape in shapes]
    log(f"--- {dtype_name}: references in {time.perf_counter() - t:.1f}s; "
        f"{len(variants)} variants x {len(cases)} shapes", args.out)
    sweep(cases, variants, args, bandwidth, deadline, results)
    del cases
  if args.out:
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
      json.dump(dict(bandwidth=bandwidth, jax=jax.__version__, device=device.device_kind,
                     results=results), f, indent=1)
  failures = [r for r in results if r.get("fwd_ok") is False or r.get("bwd_ok") is False]
  log(f"numerics failures: {len(failures)} of {len(results)} rows"
      + "".join(f"\n  {r['variant']} {r['shape']} {r['dtype']}" for r in failures), args.out)
  if not on_gpu:
    return 1 if failures else 0

  log("--- best per case (kernel alone; of copy = minimum bytes / time / copy bandwidth)", args.out)
  winners = set()
  for shape in args.shapes.split(","):
    for dtype_name in args.dtypes.split(","):
      for kind in ("fwd", "bwd"):
        r = best(results, shape, dtype_name, kind)
        if r:
          winners.add(r["variant"])
          log(f"best {kind} {shape} {dtype_name}: {r['variant']} {r[f'{kind}_ms']:.3f} ms "
              f"{r[f'{kind}_of_copy']:.1%}", args.out)
      rows = [r for r in results if r["shape"] == shape and r["dtype"] == dtype_name
              and r.get("fwd_ok") and r.get("bwd_ok") and "fwd_ms" in r and "bwd_ms" in r]
      if rows:
        r = min(rows, key=lambda r: r["fwd_ms"] + r["bwd_ms"])
        winners.add(r["variant"])
        log(f"best fwd+bwd {shape} {dtype_name}: {r['variant']} {r['fwd_ms'] + r['bwd_ms']:.3f} ms "
            f"{8 * r['fwd_ms'] / 3 / (r['fwd_ms'] + r['bwd_ms']) * r['fwd_of_copy']:.1%}", args.out)

  log("--- benchmarks/scan.py measurement (jit forward; jax.grad of sum(y) for fwd+bwd)", args.out)
  log(f"{'impl':<34} {'shape':<12} {'dtype':<8} {'fwd ms':>8} {'of copy':>8} {'f+b ms':>8} "
      f"{'of copy':>8}", args.out)
  impls = ["pallas_gpu", "xla_associative", "xla_linear"] + [f"pallas_gpu/{v}" for v in sorted(winners)]
  for shape_text in args.shapes.split(","):
    for dtype_name in args.dtypes.split(","):
      for impl in impls:
        if time.time() > deadline:
          break
        try:
          shape = tuple(int(v) for v in shape_text.split("x"))
          t_f, b_f, t_g, b_g = scan_bench.run_case(impl, shape, jnp.dtype(dtype_name), args.repeats)
          log(f"{impl:<34} {shape_text:<12} {dtype_name:<8} {t_f * 1e3:8.3f} {b_f / t_f / bandwidth:8.1%} "
              f"{t_g * 1e3:8.3f} {b_g / t_g / bandwidth:8.1%}", args.out)
        except Exception:  # pylint: disable=broad-except
          log(f"{impl} {shape_text} {dtype_name}: ERROR {traceback.format_exc(limit=1)[-300:]}", args.out)
  log(f"sweep done in {time.time() - start:.0f}s", args.out)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
