"""Pallas TPU (Mosaic) linear scan h_t = a_t * h_{t-1} + x_t, forward and backward kernels.

Layout. Arrays stay [B, T, C], so XLA passes them to the kernel without relayout copies (a variant
that reshaped to [B, T, C/128, 128] to put channels on sublanes made XLA insert a relayout copy of
every operand and result, tripling the HBM traffic; docs/kernels.md). Time is the sublane axis of a
block's (8, 128) tiles, so the kernel moves whole tiles: it loads a chunk of CHUNK rows (one native
tile of the input dtype: 8 float32 or 16 bfloat16 rows) of x and a, runs the recurrence over the rows
in registers and stores the outputs as one chunk. Dynamic
single-row accesses would need Mosaic to prove sublane alignment, which packed bfloat16 rows fail.

Grid. (batch blocks, channel blocks, time blocks): the first two are independent ("parallel", split
across TensorCores on megacore chips); time is sequential ("arbitrary") and the float32 state lives in
a VMEM scratch buffer across time blocks. T is zero-padded (a := 1, x := 0, which carries the state
unchanged) only up to a multiple of CHUNK; the last time block may be partial and the kernel then runs
only its valid chunks. Channel and batch edge blocks may be partial too (columns are independent).

Backward. With g_t = dL/dh_t the adjoint is the reverse-direction scan g_t = dy_t + a_{t+1} g_{t+1},
seeded by dL/dh_last; then dx_t = g_t, da_t = g_t * h_{t-1} and dh0 = a_0 g_0. The backward kernel
runs that scan and writes dx and da directly. h_{t-1} comes from the saved output y (the neighbouring
chunk for a chunk's first row), and from a small [B, num_time_blocks, 1, C] float32 array holding h0
or the previous block's last state for a block's first row, so nothing of full-sequence size is
materialised in float32.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common
from pallas_kernels._common import ACC_DTYPE

LANES = 128
SUBLANES = 8
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)


def chunk_rows(*dtypes) -> int:
  """Rows in one native (sublane x lane) tile: 8 for 32-bit, 16 for packed 16-bit dtypes."""
  return max(SUBLANES * 4 // jnp.dtype(d).itemsize for d in dtypes)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Block sizes of the TPU scan; each is clipped to the (padded) array's extent.

  Attributes:
    batch: batch rows per block.
    time: time steps per block (one HBM<->VMEM transfer per block and array); a multiple of 16.
    channel_tiles: 128-lane channel tiles per block; independent columns give the VPU
      instruction-level parallelism across the sequential time loop.
  """

  batch: int = 1
  time: int = 256
  channel_tiles: int = 8

  def __post_init__(self):
    for name in ("batch", "time", "channel_tiles"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name}={value!r} must be a positive int")
    if self.time % 16:
      raise ValueError(f"BlockSizes.time={self.time} must be a multiple of 16 (a bfloat16 tile's rows)")


@dataclasses.dataclass(frozen=True)
class _Grid:
  """Concrete blocks and grid for one call on [B, T, C] arrays (T already a multiple of chunk)."""

  batch: int
  time: int
  channels: int
  chunk: int
  num_batch: int
  num_time: int
  num_channel: int
  seq_len: int

  @property
  def grid(self) -> tuple[int, int, int]:
    return (self.num_batch, self.num_channel, self.num_time)


def _make_grid(shape: tuple[int, int, int], blocks: BlockSizes, chunk: int) -> _Grid:
  b, t, c = shape
  bb, bt = min(blocks.batch, b), min(blocks.time, t)
  # A block's lane dim must be a multiple of 128 or the whole axis; a partial last block is fine.
  bc = c if c <= blocks.channel_tiles * LANES else blocks.channel_tiles * LANES
  return _Grid(bb, bt, bc, chunk, pl.cdiv(b, bb), pl.cdiv(t, bt), pl.cdiv(c, bc), t)


def _time_block(grid: _Grid, s, descending: bool):
  """Index of the time block visited at grid step s (time blocks run last-to-first when descending)."""
  return grid.num_time - 1 - s if descending else s


def _seq_spec(grid: _Grid, descending: bool) -> pl.BlockSpec:
  def index_map(b, c, s):
    return (b, _time_block(grid, s, descending), c)
  return pl.BlockSpec((grid.batch, grid.time, grid.channels), index_map)


def _state_spec(grid: _Grid) -> pl.BlockSpec:
  def index_map(b, c, s):
    del s  # The state block stays resident across the sequential time axis.
    return (b, 0, c)
  # [B, 1, C] rather than [B, C]: a block's two minor dims must be whole axes or (8, 128) multiples.
  return pl.BlockSpec((grid.batch, 1, grid.channels), index_map)


def _num_chunks(grid: _Grid, block):
  valid = jnp.minimum(grid.time, grid.seq_len - block * grid.time)
  # lax.div: non-negative operands, and jnp's floor division lowers through sign(), which Mosaic
  # resolves against the local device kind (failing in ahead-of-time compiles on a CPU host).
  return jax.lax.div(valid, jnp.int32(grid.chunk))


def _chunk_order(num_chunks, descending: bool):
  """Maps loop iteration j to the index of the chunk it visits (scan order)."""
  def chunk_index(j):
    return num_chunks - 1 - j if descending else j
  return chunk_index


def _fwd_kernel(x_ref, a_ref, h0_ref, y_ref, h_last_ref, h_scr, *, grid: _Grid, descending: bool):
  s = pl.program_id(2)
  k = grid.chunk
  rows = range(k - 1, -1, -1) if descending else range(k)

  @pl.when(s == 0)
  def _init():
    h_scr[...] = h0_ref[:, 0]

  num_chunks = _num_chunks(grid, _time_block(grid, s, descending))
  chunk_index = _chunk_order(num_chunks, descending)

  def chunk(j, h):
    t0 = pl.multiple_of(chunk_index(j) * k, k)
    x = x_ref[:, pl.ds(t0, k)].astype(ACC_DTYPE)
    a = a_ref[:, pl.ds(t0, k)].astype(ACC_DTYPE)
    y = [None] * k
    for i in rows:
      h = a[:, i] * h + x[:, i]
      y[i] = h
    # Assembling the chunk in registers (sublane selects on the VALUs) and storing it once beats
    # k single-row stores: the store slot, not the VALUs, was the bottleneck in Mosaic's output.
    y_ref[:, pl.ds(t0, k)] = jnp.stack(y, axis=1).astype(y_ref.dtype)
    return h

  h = jax.lax.fori_loop(0, num_chunks, chunk, h_scr[...])
  h_scr[...] = h

  @pl.when(s == grid.num_time - 1)
  def _finish():
    h_last_ref[:, 0] = h


def _bwd_kernel(dy_ref, a_ref, y_ref, h_edge_ref, dh_last_ref, dx_ref, da_ref, dh0_ref, m_scr, *,
                grid: _Grid, fwd_descending: bool):
  """Adjoint scan; m carries a_{t+1} g_{t+1}, the gradient flowing into h_t from later steps."""
  s = pl.program_id(2)
  k = grid.chunk
  descending = not fwd_descending  # The adjoint runs against the forward's direction.
  rows = range(k - 1, -1, -1) if descending else range(k)

  @pl.when(s == 0)
  def _init():
    m_scr[...] = dh_last_ref[:, 0]

  num_chunks = _num_chunks(grid, _time_block(grid, s, descending))
  chunk_index = _chunk_order(num_chunks, descending)
  h_edge = h_edge_ref[:, 0, 0]

  def chunk(j, m):
    c = chunk_index(j)
    t0 = pl.multiple_of(c * k, k)
    dy = dy_ref[:, pl.ds(t0, k)].astype(ACC_DTYPE)
    a = a_ref[:, pl.ds(t0, k)].astype(ACC_DTYPE)
    y = y_ref[:, pl.ds(t0, k)].astype(ACC_DTYPE)
    # The state before the chunk's first forward row: a row of the neighbouring chunk (the previous
    # one in forward order), or the block's edge state. Loading that whole chunk keeps the load aligned.
    if fwd_descending:
      neighbour = jnp.minimum(c + 1, num_chunks - 1)
      outer = jnp.where(c + 1 < num_chunks, y_ref[:, pl.ds(pl.multiple_of(neighbour * k, k), k)]
                        .astype(ACC_DTYPE)[:, 0], h_edge)
    else:
      neighbour = jnp.maximum(c - 1, 0)
      outer = jnp.where(c > 0, y_ref[:, pl.ds(pl.multiple_of(neighbour * k, k), k)]
                        .astype(ACC_DTYPE)[:, k - 1], h_edge)
    dx, da = [None] * k, [None] * k
    for i in rows:
      if fwd_descending:
        h_prev = y[:, i + 1] if i < k - 1 else outer
      else:
        h_prev = y[:, i - 1] if i > 0 else outer
      g = dy[:, i] + m
      dx[i], da[i] = g, g * h_prev
      m = a[:, i] * g
    dx_ref[:, pl.ds(t0, k)] = jnp.stack(dx, axis=1).astype(dx_ref.dtype)
    da_ref[:, pl.ds(t0, k)] = jnp.stack(da, axis=1).astype(da_ref.dtype)
    return m

  m = jax.lax.fori_loop(0, num_chunks, chunk, m_scr[...])
  m_scr[...] = m

  @pl.when(s == grid.num_time - 1)
  def _finish():
    dh0_ref[:, 0] = m


def _compiler_params() -> pltpu.CompilerParams:
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _cost(flops_per_element: int, arrays: list[jax.Array]) -> pl.CostEstimate:
  """Tells XLA's scheduler the kernel is a cheap, memory-bound pass over its operands."""
  elements = arrays[0].size
  return pl.CostEstimate(flops=flops_per_element * elements, transcendentals=0,
                         bytes_accessed=sum(v.size * v.dtype.itemsize for v in arrays))


def _fwd_call(x, a, h0, *, reverse: bool, blocks: BlockSizes, interpret: bool):
  grid = _make_grid(x.shape, blocks, chunk_rows(x.dtype, a.dtype))
  seq_spec, state_spec = _seq_spec(grid, reverse), _state_spec(grid)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, grid=grid, descending=reverse),
      grid=grid.grid,
      in_specs=[seq_spec, seq_spec, state_spec],
      out_specs=[seq_spec, state_spec],
      out_shape=[_common.out_struct(x.shape, x.dtype, x),
                 _common.out_struct(h0.shape, ACC_DTYPE, x)],
      scratch_shapes=[pltpu.VMEM((grid.batch, grid.channels), ACC_DTYPE)],
      compiler_params=_compiler_params(),
      cost_estimate=_cost(2, [x, a, x]),
      interpret=interpret,
      name="linear_scan_fwd",
  )(x, a, h0)


def _edge_states(y, h0, grid: _Grid, reverse: bool):
  """[B, num_time_blocks, 1, C] f32: per time block, the state before its first forward step.

  The unit axis keeps a block's two minor dims legal on TPU (whole axes or (8, 128) multiples).
  """
  bt = grid.time
  if reverse:
    # The reversed scan enters block k at its last row, coming from the first row of block k + 1;
    # the last block starts from h0.
    parts = [y[:, bt::bt].astype(ACC_DTYPE), h0]
  else:
    parts = [h0, y[:, bt - 1:grid.seq_len - 1:bt].astype(ACC_DTYPE)]
  return jnp.expand_dims(jnp.concatenate(parts, axis=1), 2)


def _bwd_call(dy, a, y, h0, dh_last, *, reverse: bool, blocks: BlockSizes, interpret: bool):
  grid = _make_grid(dy.shape, blocks, chunk_rows(y.dtype, a.dtype))
  descending = not reverse
  seq_spec, state_spec = _seq_spec(grid, descending), _state_spec(grid)
  edge_spec = pl.BlockSpec((grid.batch, 1, 1, grid.channels),
                           lambda b, c, s: (b, _time_block(grid, s, descending), 0, c))
  h_edge = _edge_states(y, h0, grid, reverse)
  return pl.pallas_call(
      functools.partial(_bwd_kernel, grid=grid, fwd_descending=reverse),
      grid=grid.grid,
      in_specs=[seq_spec, seq_spec, seq_spec, edge_spec, state_spec],
      out_specs=[seq_spec, seq_spec, state_spec],
      out_shape=[_common.out_struct(dy.shape, y.dtype, dy),
                 _common.out_struct(a.shape, a.dtype, dy),
                 _common.out_struct(h0.shape, ACC_DTYPE, dy)],
      scratch_shapes=[pltpu.VMEM((grid.batch, grid.channels), ACC_DTYPE)],
      compiler_params=_compiler_params(),
      cost_estimate=_cost(4, [dy, a, y, dy, a]),
      interpret=interpret,
      name="linear_scan_bwd",
  )(dy, a, y, h_edge, dh_last)


_scan = _common.make_scan(_fwd_call, _bwd_call)


def run(x: jax.Array, a: jax.Array, h0: Optional[jax.Array], *, reverse: bool,
        block_sizes: BlockSizes, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """`linear_scan` without its argument checks (for the dispatcher, which ran them)."""
  seq_len = x.shape[1]
  h0 = _common.initial_state(x, h0)
  # Pad time to whole tiles with identity steps (a = 1, x = 0), on the side the scan visits last.
  pad = -seq_len % chunk_rows(x.dtype, a.dtype)
  if pad:
    where = [(0, 0), (pad, 0) if reverse else (0, pad), (0, 0)]
    x = jnp.pad(x, where)
    a = jnp.pad(a, where, constant_values=1)
  y, h_last = _scan(x, a, h0[:, None], reverse, block_sizes, interpret)
  if pad:
    y = y[:, pad:] if reverse else y[:, :seq_len]
  return y, h_last[:, 0]


def linear_scan(
    x: jax.Array,
    a: jax.Array,
    h0: Optional[jax.Array] = None,
    *,
    reverse: bool = False,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Pallas TPU scan h_t = a_t * h_{t-1} + x_t over axis 1; float32 state; custom VJP kernel.

  Args:
    x: [batch, time, channels], float32 or bfloat16.
    a: decays, x's shape, float32 or bfloat16.
    h0: optional [batch, channels] initial state (zeros when None).
    reverse: scan from the last step to the first.
    block_sizes: kernel tiling.
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    (y, h_last): y in x's dtype and shape; h_last float32 [batch, channels].
  """
  _common.check_operands(x, a, h0)
  _common.check_dtypes("pallas_tpu", SUPPORTED_DTYPES, x, a)
  return run(x, a, h0, reverse=reverse, block_sizes=block_sizes, interpret=interpret)
