"""Pallas GPU (Triton) linear scan h_t = a_t * h_{t-1} + x_t: chunked forward and backward kernels.

The first version (one program per batch row and channel block, walking the whole sequence) was
correct but latency-bound on an H200: a few dozen programs, each paying one global-memory latency per
time step (3-9% of copy bandwidth; docs/kernels.md). This version raises parallelism and
memory-level parallelism two ways:

- **Time chunks.** The grid is (batch, channel block, time chunk). The map a chunk applies to its
  incoming state is affine, `h_out = P_k h_in + c_k` (`P_k` the product of its decays, `c_k` its
  scan from zero). Pass 1 (`_summary_kernel`, only when there is more than one chunk) writes
  (P_k, c_k) per (batch, chunk, channel) in float32; pass 2 folds the summaries of the earlier chunks
  into the chunk's exact incoming state (a short loop over at most `num_chunks` vectors) and rescans
  the chunk from it, writing the outputs. Rescanning reads x and a twice (5 array passes forward
  instead of 3) but never rounds a partial result to the output dtype.
- **Unrolled steps.** Each loop iteration loads `unroll` time steps of a and x before the dependent
  multiply-add chain, so that many loads are in flight per program instead of one.

The number of chunks is chosen from the shape (enough programs to fill the GPU, chunks of at least
`MIN_CHUNK` steps) unless `BlockSizes.chunk` fixes the chunk length; one chunk means a single pass.

The backward kernel is the adjoint scan run in the opposite direction (see tpu.py for the algebra):
g_t = dy_t + a_{t+1} g_{t+1}, dx_t = g_t, da_t = g_t * h_{t-1} (h_{t-1} read back from the saved y,
h0 at the sequence start), dh0 = a_0 g_0. Its carried state m = a g obeys m' = a m + a dy, which is
affine again, so it is chunked the same way.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common
from pallas_kernels._common import ACC_DTYPE

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# Automatic chunking: split time until about this many programs run (an H200 has 132 SMs), but keep
# chunks at least MIN_CHUNK steps long so the carry fold stays small against the chunk's own work.
TARGET_PROGRAMS = 1024
MIN_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Channels per program (a power of two), time steps per chunk and per loop iteration, launch.

  chunk: time steps per program; 0 chooses it from the shape (TARGET_PROGRAMS, MIN_CHUNK). A multiple
    of `unroll`.
  unroll: time steps whose loads are issued together in one loop iteration.
  """

  channels: int = 256
  chunk: int = 0
  unroll: int = 8
  num_warps: int = 4
  num_stages: int = 1

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
  return _Plan(block_c, chunk, pl.cdiv(seq_len, chunk), unroll)


def _columns(block_c: int, channels: int):
  cols = pl.program_id(1) * block_c + jnp.arange(block_c)
  return cols, cols < channels


def _chunk_loop(p: _Plan, seq_len: int, walk_reverse: bool, body, carry):
  """Runs `body(steps, carry) -> carry` over this program's chunk, `unroll` steps per call.

  `steps` lists (t, valid) per step in walk order: t the time index (clamped into range), valid
  whether the step exists (the last chunk may be partial); invalid steps must act as the identity.
  """
  k = pl.program_id(2)

  def iteration(i, carry):
    steps = []
    for j in range(p.unroll):
      s = k * p.chunk + i * p.unroll + j
      t = seq_len - 1 - s if walk_reverse else s
      steps.append((jnp.clip(t, 0, seq_len - 1), s < seq_len))
    return body(steps, carry)

  return jax.lax.fori_loop(0, p.chunk // p.unroll, iteration, carry)


def _incoming(init_ref, p_ref, c_ref, b, cols, mask, num_chunks: int):
  """This chunk's incoming state: the initial state folded through the earlier chunks' summaries."""
  k = pl.program_id(2)
  state = plgpu.load(init_ref.at[b, cols], mask=mask, other=0.0)
  if p_ref is None:
    return state

  def fold(j, state):
    m = mask & (j < k)
    prod = plgpu.load(p_ref.at[b, j, cols], mask=m, other=1.0)
    c = plgpu.load(c_ref.at[b, j, cols], mask=m, other=0.0)
    return prod * state + c

  return jax.lax.fori_loop(0, num_chunks, fold, state)


def _summary_kernel(u_ref, a_ref, p_ref, c_ref, *, p: _Plan, walk_reverse: bool, scale_by_a: bool):
  """(P, c) of this chunk: product of a, and the scan s' = a s + u (or a (s + u)) from zero."""
  b = pl.program_id(0)
  seq_len, channels = u_ref.shape[1], u_ref.shape[2]
  cols, mask = _columns(p.block_c, channels)

  def body(steps, carry):
    prod, s = carry
    loads = [(plgpu.load(a_ref.at[b, t, cols], mask=mask & v, other=1.0).astype(ACC_DTYPE),
              plgpu.load(u_ref.at[b, t, cols], mask=mask & v, other=0.0).astype(ACC_DTYPE))
             for t, v in steps]
    for a, u in loads:
      s = a * (s + u) if scale_by_a else a * s + u
      prod = prod * a
    return prod, s

  zeros = jnp.zeros((p.block_c,), ACC_DTYPE)
  prod, s = _chunk_loop(p, seq_len, walk_reverse, body, (zeros + 1.0, zeros))
  k = pl.program_id(2)
  plgpu.store(p_ref.at[b, k, cols], prod, mask=mask)
  plgpu.store(c_ref.at[b, k, cols], s, mask=mask)


def _fwd_kernel(x_ref, a_ref, h0_ref, *refs, p: _Plan, reverse: bool):
  p_ref, c_ref = refs[:2] if p.num_chunks > 1 else (None, None)
  y_ref, h_last_ref = refs[-2:]
  b = pl.program_id(0)
  seq_len, channels = x_ref.shape[1], x_ref.shape[2]
  cols, mask = _columns(p.block_c, channels)

  def body(steps, h):
    loads = [(plgpu.load(a_ref.at[b, t, cols], mask=mask & v, other=1.0).astype(ACC_DTYPE),
              plgpu.load(x_ref.at[b, t, cols], mask=mask & v, other=0.0).astype(ACC_DTYPE))
             for t, v in steps]
    for (t, v), (a, x) in zip(steps, loads):
      h = a * h + x
      plgpu.store(y_ref.at[b, t, cols], h.astype(y_ref.dtype), mask=mask & v)
    return h

  h = _incoming(h0_ref, p_ref, c_ref, b, cols, mask, p.num_chunks)
  h = _chunk_loop(p, seq_len, reverse, body, h)
  plgpu.store(h_last_ref.at[b, cols], h, mask=mask & (pl.program_id(2) == p.num_chunks - 1))


def _bwd_kernel(dy_ref, a_ref, y_ref, h0_ref, dh_last_ref, *refs, p: _Plan, reverse: bool):
  p_ref, c_ref = refs[:2] if p.num_chunks > 1 else (None, None)
  dx_ref, da_ref, dh0_ref = refs[-3:]
  b = pl.program_id(0)
  seq_len, channels = dy_ref.shape[1], dy_ref.shape[2]
  cols, mask = _columns(p.block_c, channels)
  h0 = plgpu.load(h0_ref.at[b, cols], mask=mask, other=0.0)
  # Forward order: h_{t-1} sits at t + prev; the adjoint visits t against the forward direction.
  prev = 1 if reverse else -1
  first = seq_len - 1 if reverse else 0  # The forward's first step, whose h_{t-1} is h0.

  def body(steps, m):
    loads = []
    for t, v in steps:
      t_prev = jnp.clip(t + prev, 0, seq_len - 1)
      loads.append((
          plgpu.load(dy_ref.at[b, t, cols], mask=mask & v, other=0.0).astype(ACC_DTYPE),
          plgpu.load(a_ref.at[b, t, cols], mask=mask & v, other=1.0).astype(ACC_DTYPE),
          plgpu.load(y_ref.at[b, t_prev, cols], mask=mask & v, other=0.0).astype(ACC_DTYPE)))
    for (t, v), (dy, a, y_prev) in zip(steps, loads):
      g = dy + m
      h_prev = jnp.where(t == first, h0, y_prev)
      plgpu.store(dx_ref.at[b, t, cols], g.astype(dx_ref.dtype), mask=mask & v)
      plgpu.store(da_ref.at[b, t, cols], (g * h_prev).astype(da_ref.dtype), mask=mask & v)
      m = a * g
    return m

  m = _incoming(dh_last_ref, p_ref, c_ref, b, cols, mask, p.num_chunks)
  m = _chunk_loop(p, seq_len, not reverse, body, m)
  plgpu.store(dh0_ref.at[b, cols], m, mask=mask & (pl.program_id(2) == p.num_chunks - 1))


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
