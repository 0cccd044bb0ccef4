"""Pallas GPU (Triton) linear scan h_t = a_t * h_{t-1} + x_t: streaming forward and backward kernels.

A scan moves little data per flop, so the kernel is measured against copy bandwidth, and the
obstacle is memory latency, not arithmetic: each channel's steps are serial, so a program can only
hide latency by having many time steps' loads in flight at once (docs/kernels.md has the history:
3-9% of copy bandwidth for one-step-at-a-time programs, 43-52% for the chunked two-pass version).

- **Single pass, many loads in flight** (a plan with one chunk; not yet measured on a GPU, so not
  the default). A program owns a few channels (BlockSizes.channels, e.g. 32 = one 128-byte row per
  array and step in float32, one warp) of one batch row and walks the whole sequence once: x and
  a are read once and y written once, the minimum traffic. Parallelism comes from the number of programs (batch * channels / block) and, inside each, from
  `unroll` time steps whose loads are issued before their dependent multiply-add chain, with the
  next iteration's loads issued before this iteration's chain (`prefetch`, a register double
  buffer), so about 2 * unroll steps of each operand are in flight per thread.
- **Time chunks** (the default, measured at 43-52% of copy bandwidth: the automatic plan splits
  time until about TARGET_PROGRAMS programs run). The map a chunk applies to its incoming state
  is affine, `h_out = P_k h_in + c_k` (`P_k` the product of its decays, `c_k` its scan from zero). Pass 1
  (`_summary_kernel`) writes (P_k, c_k) per (batch, chunk, channel) in float32; pass 2 folds the
  summaries of the earlier chunks into the chunk's exact incoming state and rescans the chunk from
  it. Rescanning reads x and a twice (5 array passes forward instead of 3).

Masks are generated only where a shape needs them (channels not a multiple of the block, time not
a multiple of the chunk), so the aligned case issues plain vector loads at constant offsets.

The backward kernel is the adjoint scan run in the opposite direction (see tpu.py for the algebra):
g_t = dy_t + a_{t+1} g_{t+1}, dx_t = g_t, da_t = g_t * h_{t-1} (h_{t-1} read back from the saved y,
h0 at the sequence start), dh0 = a_0 g_0. Its carried state m = a g obeys m' = a m + a dy, which is
affine again, so it streams and chunks the same way.
"""

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common
from pallas_kernels._common import ACC_DTYPE

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# Automatic chunking (BlockSizes.chunk == 0): split time until about TARGET_PROGRAMS programs run (an
# H200 has 132 SMs), with chunks at least MIN_CHUNK steps long so the carry fold stays small against
# the chunk's own work. This is the rule measured on an H200 with the default blocks (256 channels,
# 4 warps); a single pass is `chunk` >= the sequence length.
TARGET_PROGRAMS = 1024
MIN_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Channels per program (a power of two), time steps per chunk and per loop iteration, launch.

  The defaults are the chunked plan measured on an H200 (docs/benchmarks.md, "Linear-scan kernels"). The single-pass
  candidate, e.g. BlockSizes(channels=32, chunk=65536, unroll=16, num_warps=1, prefetch=True), is
  what benchmarks/scan_gpu_sweep.py times against it; it becomes the default only once measured.

  chunk: time steps per program; 0 chooses from the shape (TARGET_PROGRAMS, MIN_CHUNK); at least
    the sequence length means a single pass. A multiple of `unroll`.
  unroll: time steps whose loads are issued together in one loop iteration.
  prefetch: issue the next iteration's loads before this iteration's dependent chain.
  """

  channels: int = 256
  chunk: int = 0
  unroll: int = 8
  num_warps: int = 4
  num_stages: int = 1
  prefetch: bool = False

  def __post_init__(self):
    for name in ("channels", "unroll", "num_warps", "num_stages"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name}={value!r} must be a positive int")
    if not isinstance(self.chunk, int) or self.chunk < 0:
      raise ValueError(f"BlockSizes.chunk={self.chunk!r} must be a non-negative int (0: automatic)")
    if self.channels & (self.channels - 1):
      raise ValueError(f"BlockSizes.channels={self.channels} must be a power of two (Triton blocks)")
    if self.chunk % self.unroll:
      raise ValueError(f"BlockSizes.chunk={self.chunk} must be a multiple of unroll={self.unroll}")


@dataclasses.dataclass(frozen=True)
class _Plan:
  block_c: int
  chunk: int  # time steps per program, a multiple of unroll
  num_chunks: int
  unroll: int
  prefetch: bool
  mask_c: bool  # channels is not a multiple of block_c
  mask_t: bool  # the last chunk is partial


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def plan(shape, blocks: BlockSizes) -> _Plan:
  """Block, chunk length and number of chunks for a [batch, time, channels] scan."""
  batch, seq_len, channels = shape
  block_c = min(blocks.channels, pl.next_power_of_2(channels))
  unroll = min(blocks.unroll, pl.next_power_of_2(seq_len))
  if blocks.chunk:
    chunk = blocks.chunk
  else:
    programs = batch * pl.cdiv(channels, block_c)
    num_chunks = max(1, min(pl.cdiv(TARGET_PROGRAMS, programs), seq_len // MIN_CHUNK))
    chunk = pl.cdiv(seq_len, num_chunks)
  chunk = min(_round_up(chunk, unroll), _round_up(seq_len, unroll))
  num_chunks = pl.cdiv(seq_len, chunk)
  return _Plan(block_c, chunk, num_chunks, unroll, blocks.prefetch,
               mask_c=channels % block_c != 0, mask_t=num_chunks * chunk != seq_len)


def _and(*masks):
  """Conjunction of the masks that exist; None (no mask at all) when none does."""
  masks = [m for m in masks if m is not None]
  return functools.reduce(jnp.logical_and, masks) if masks else None


def _load(ref, mask, other):
  return plgpu.load(ref, mask=mask, other=None if mask is None else other)


def _columns(p: _Plan, channels: int):
  """This program's channel index (a contiguous slice when aligned) and its mask (None if aligned)."""
  start = pl.program_id(1) * p.block_c
  if not p.mask_c:
    return pl.ds(pl.multiple_of(start, p.block_c), p.block_c), None
  cols = start + jnp.arange(p.block_c)
  return cols, cols < channels


def _stream(p: _Plan, seq_len: int, walk_reverse: bool, load: Callable, compute: Callable, carry):
  """Walks this program's chunk `unroll` steps per loop iteration.

  `load(steps) -> values` issues one iteration's loads, `compute(steps, values, carry) -> carry`
  runs its dependent chain; `steps` lists (t, valid) per step in walk order: t the time index,
  valid None when every step exists, else whether it does (the last chunk may be partial; invalid
  steps must act as the identity). With `prefetch` the next iteration's loads are issued before
  this iteration's chain (the last iteration reloads its own steps rather than branch).
  """
  k = pl.program_id(2)
  n = p.chunk // p.unroll

  def steps(i):
    out = []
    for j in range(p.unroll):
      s = k * p.chunk + i * p.unroll + j
      t = seq_len - 1 - s if walk_reverse else s
      out.append((jnp.clip(t, 0, seq_len - 1), s < seq_len) if p.mask_t else (t, None))
    return out

  if not p.prefetch:
    return jax.lax.fori_loop(0, n, lambda i, c: compute(steps(i), load(steps(i)), c), carry)

  def iteration(i, state):
    carry, values = state
    upcoming = load(steps(jnp.minimum(i + 1, n - 1)))
    return compute(steps(i), values, carry), upcoming

  carry, _ = jax.lax.fori_loop(0, n, iteration, (carry, load(steps(0))))
  return carry


def _incoming(init_ref, p_ref, c_ref, b, cols, cmask, num_chunks: int):
  """This chunk's incoming state: the initial state folded through the earlier chunks' summaries."""
  k = pl.program_id(2)
  state = _load(init_ref.at[b, cols], cmask, 0.0)
  if p_ref is None:
    return state

  def fold(j, state):
    prod = _load(p_ref.at[b, j, cols], cmask, 1.0)
    c = _load(c_ref.at[b, j, cols], cmask, 0.0)
    return jnp.where(j < k, prod * state + c, state)

  return jax.lax.fori_loop(0, num_chunks, fold, state)


def _store_last(ref, b, cols, cmask, value, num_chunks: int):
  """Stores the carried state of the last chunk (the only one that reaches the sequence end)."""
  @pl.when(pl.program_id(2) == num_chunks - 1)
  def _():
    plgpu.store(ref.at[b, cols], value, mask=cmask)


def _summary_kernel(u_ref, a_ref, p_ref, c_ref, *, p: _Plan, walk_reverse: bool, scale_by_a: bool):
  """(P, c) of this chunk: product of a, and the scan s' = a s + u (or a (s + u)) from zero."""
  b = pl.program_id(0)
  seq_len, channels = u_ref.shape[1], u_ref.shape[2]
  cols, cmask = _columns(p, channels)

  def load(steps):
    return [(_load(a_ref.at[b, t, cols], _and(cmask, v), 1.0),
             _load(u_ref.at[b, t, cols], _and(cmask, v), 0.0)) for t, v in steps]

  def compute(steps, values, carry):
    prod, s = carry
    for a, u in values:
      a, u = a.astype(ACC_DTYPE), u.astype(ACC_DTYPE)
      s = a * (s + u) if scale_by_a else a * s + u
      prod = prod * a
    return prod, s

  zeros = jnp.zeros((p.block_c,), ACC_DTYPE)
  prod, s = _stream(p, seq_len, walk_reverse, load, compute, (zeros + 1.0, zeros))
  k = pl.program_id(2)
  plgpu.store(p_ref.at[b, k, cols], prod, mask=cmask)
  plgpu.store(c_ref.at[b, k, cols], s, mask=cmask)


def _fwd_kernel(x_ref, a_ref, h0_ref, *refs, p: _Plan, reverse: bool):
  p_ref, c_ref = refs[:2] if p.num_chunks > 1 else (None, None)
  y_ref, h_last_ref = refs[-2:]
  b = pl.program_id(0)
  seq_len, channels = x_ref.shape[1], x_ref.shape[2]
  cols, cmask = _columns(p, channels)

  def load(steps):
    return [(_load(a_ref.at[b, t, cols], _and(cmask, v), 1.0),
             _load(x_ref.at[b, t, cols], _and(cmask, v), 0.0)) for t, v in steps]

  def compute(steps, values, h):
    for (t, v), (a, x) in zip(steps, values):
      h = a.astype(ACC_DTYPE) * h + x.astype(ACC_DTYPE)
      plgpu.store(y_ref.at[b, t, cols], h.astype(y_ref.dtype), mask=_and(cmask, v))
    return h

  h = _incoming(h0_ref, p_ref, c_ref, b, cols, cmask, p.num_chunks)
  h = _stream(p, seq_len, reverse, load, compute, h)
  _store_last(h_last_ref, b, cols, cmask, h, p.num_chunks)


def _bwd_kernel(dy_ref, a_ref, y_ref, h0_ref, dh_last_ref, *refs, p: _Plan, reverse: bool):
  p_ref, c_ref = refs[:2] if p.num_chunks > 1 else (None, None)
  dx_ref, da_ref, dh0_ref = refs[-3:]
  b = pl.program_id(0)
  seq_len, channels = dy_ref.shape[1], dy_ref.shape[2]
  cols, cmask = _columns(p, channels)
  h0 = _load(h0_ref.at[b, cols], cmask, 0.0)
  # Forward order: h_{t-1} sits at t + prev; the adjoint visits t against the forward direction.
  prev = 1 if reverse else -1
  first = seq_len - 1 if reverse else 0  # The forward's first step, whose h_{t-1} is h0.

  def load(steps):
    return [(_load(dy_ref.at[b, t, cols], _and(cmask, v), 0.0),
             _load(a_ref.at[b, t, cols], _and(cmask, v), 1.0),
             _load(y_ref.at[b, jnp.clip(t + prev, 0, seq_len - 1), cols], _and(cmask, v), 0.0))
            for t, v in steps]

  def compute(steps, values, m):
    for (t, v), (dy, a, y_prev) in zip(steps, values):
      g = dy.astype(ACC_DTYPE) + m
      h_prev = jnp.where(t == first, h0, y_prev.astype(ACC_DTYPE))
      plgpu.store(dx_ref.at[b, t, cols], g.astype(dx_ref.dtype), mask=_and(cmask, v))
      plgpu.store(da_ref.at[b, t, cols], (g * h_prev).astype(da_ref.dtype), mask=_and(cmask, v))
      m = a.astype(ACC_DTYPE) * g
    return m

  m = _incoming(dh_last_ref, p_ref, c_ref, b, cols, cmask, p.num_chunks)
  m = _stream(p, seq_len, not reverse, load, compute, m)
  _store_last(dh0_ref, b, cols, cmask, m, p.num_chunks)
def _params(blocks: BlockSizes) -> plgpu.CompilerParams:
  return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _grid(shape, p: _Plan):
  return (shape[0], pl.cdiv(shape[2], p.block_c), p.num_chunks)


def _summaries(u, a, p: _Plan, *, walk_reverse: bool, scale_by_a: bool, blocks: BlockSizes,
               interpret: bool, name: str):
  """Pass 1: (P, c) float32 [batch, num_chunks, channels]; () when there is a single chunk."""
  if p.num_chunks == 1:
    return ()
  shape = (u.shape[0], p.num_chunks, u.shape[2])
  return tuple(pl.pallas_call(
      functools.partial(_summary_kernel, p=p, walk_reverse=walk_reverse, scale_by_a=scale_by_a),
      grid=_grid(u.shape, p),
      out_shape=[_common.out_struct(shape, ACC_DTYPE, u), _common.out_struct(shape, ACC_DTYPE, u)],
      compiler_params=_params(blocks),
      interpret=interpret,
      name=name,
  )(u, a))


def _fwd_call(x, a, h0, *, reverse: bool, blocks: BlockSizes, interpret: bool):
  p = plan(x.shape, blocks)
  sums = _summaries(x, a, p, walk_reverse=reverse, scale_by_a=False, blocks=blocks,
                    interpret=interpret, name="linear_scan_fwd_chunks_gpu")
  return pl.pallas_call(
      functools.partial(_fwd_kernel, p=p, reverse=reverse),
      grid=_grid(x.shape, p),
      out_shape=[_common.out_struct(x.shape, x.dtype, x), _common.out_struct(h0.shape, ACC_DTYPE, x)],
      compiler_params=_params(blocks),
      interpret=interpret,
      name="linear_scan_fwd_gpu",
  )(x, a, h0, *sums)


def _bwd_call(dy, a, y, h0, dh_last, *, reverse: bool, blocks: BlockSizes, interpret: bool):
  p = plan(dy.shape, blocks)
  sums = _summaries(dy, a, p, walk_reverse=not reverse, scale_by_a=True, blocks=blocks,
                    interpret=interpret, name="linear_scan_bwd_chunks_gpu")
  return pl.pallas_call(
      functools.partial(_bwd_kernel, p=p, reverse=reverse),
      grid=_grid(dy.shape, p),
      out_shape=[_common.out_struct(dy.shape, y.dtype, dy),
                 _common.out_struct(a.shape, a.dtype, dy),
                 _common.out_struct(h0.shape, ACC_DTYPE, dy)],
      compiler_params=_params(blocks),
      interpret=interpret,
      name="linear_scan_bwd_gpu",
  )(dy, a, y, h0, dh_last, *sums)


_scan = _common.make_scan(_fwd_call, _bwd_call)


def run(x: jax.Array, a: jax.Array, h0: Optional[jax.Array], *, reverse: bool,
        block_sizes: BlockSizes, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """`linear_scan` without its argument checks (for the dispatcher, which ran them)."""
  return _scan(x, a, _common.initial_state(x, h0), reverse, block_sizes, interpret)


def linear_scan(
    x: jax.Array,
    a: jax.Array,
    h0: Optional[jax.Array] = None,
    *,
    reverse: bool = False,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Pallas GPU scan h_t = a_t * h_{t-1} + x_t over axis 1; float32 state; custom VJP kernel.

  Args:
    x: [batch, time, channels], float32, bfloat16 or float16.
    a: decays, x's shape and a supported dtype.
    h0: optional [batch, channels] initial state (zeros when None).
    reverse: scan from the last step to the first.
    block_sizes: channels per program, time chunking and Triton launch parameters.
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    (y, h_last): y in x's dtype and shape; h_last float32 [batch, channels].
  """
  _common.check_operands(x, a, h0)
  _common.check_dtypes("pallas_gpu", SUPPORTED_DTYPES, x, a)
  return run(x, a, h0, reverse=reverse, block_sizes=block_sizes, interpret=interpret)
