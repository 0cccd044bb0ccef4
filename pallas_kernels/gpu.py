"""Pallas GPU (Triton) linear scan h_t = a_t * h_{t-1} + x_t, forward and backward kernels.

Each program owns one batch row and a power-of-two block of channels (Triton's vectors are
power-of-two sized; the channel tail is masked) and walks the whole sequence with the float32 state
in registers. Loads for later steps do not depend on the state, so Triton's software pipelining can
issue them ahead of the dependent multiply-add chain; parallelism comes from batch x channel blocks.

The backward kernel is the adjoint scan run in the opposite direction (see tpu.py for the algebra):
g_t = dy_t + a_{t+1} g_{t+1}, dx_t = g_t, da_t = g_t * h_{t-1} (h_{t-1} read back from the saved y,
h0 at the sequence start), dh0 = a_0 g_0.

No GPU was available while this was written: numerics are verified in Pallas interpret mode only,
and block sizes / warps are untuned defaults (docs/kernels.md).
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


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Channels per program (a power of two) and Triton launch parameters."""

  channels: int = 256
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for name in ("channels", "num_warps", "num_stages"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name}={value!r} must be a positive int")
    if self.channels & (self.channels - 1):
      raise ValueError(f"BlockSizes.channels={self.channels} must be a power of two (Triton blocks)")


def _columns(block_c: int, channels: int):
  cols = pl.program_id(1) * block_c + jnp.arange(block_c)
  return cols, cols < channels


def _fwd_kernel(x_ref, a_ref, h0_ref, y_ref, h_last_ref, *, block_c: int, reverse: bool):
  b = pl.program_id(0)
  seq_len, channels = x_ref.shape[1], x_ref.shape[2]
  cols, mask = _columns(block_c, channels)

  def step(i, h):
    t = seq_len - 1 - i if reverse else i
    a = plgpu.load(a_ref.at[b, t, cols], mask=mask, other=0.0).astype(ACC_DTYPE)
    x = plgpu.load(x_ref.at[b, t, cols], mask=mask, other=0.0).astype(ACC_DTYPE)
    h = a * h + x
    plgpu.store(y_ref.at[b, t, cols], h.astype(y_ref.dtype), mask=mask)
    return h

  h = plgpu.load(h0_ref.at[b, cols], mask=mask, other=0.0)
  h = jax.lax.fori_loop(0, seq_len, step, h)
  plgpu.store(h_last_ref.at[b, cols], h, mask=mask)


def _bwd_kernel(dy_ref, a_ref, y_ref, h0_ref, dh_last_ref, dx_ref, da_ref, dh0_ref, *,
                block_c: int, reverse: bool):
  b = pl.program_id(0)
  seq_len, channels = dy_ref.shape[1], dy_ref.shape[2]
  cols, mask = _columns(block_c, channels)
  h0 = plgpu.load(h0_ref.at[b, cols], mask=mask, other=0.0)
  # Forward order: h_{t-1} sits at t + prev; the adjoint visits t against the forward direction.
  prev = 1 if reverse else -1
  first = seq_len - 1 if reverse else 0  # The forward's first step, whose h_{t-1} is h0.

  def step(i, m):
    t = i if reverse else seq_len - 1 - i
    g = plgpu.load(dy_ref.at[b, t, cols], mask=mask, other=0.0).astype(ACC_DTYPE) + m
    t_prev = jnp.clip(t + prev, 0, seq_len - 1)
    y_prev = plgpu.load(y_ref.at[b, t_prev, cols], mask=mask, other=0.0).astype(ACC_DTYPE)
    h_prev = jnp.where(t == first, h0, y_prev)
    plgpu.store(dx_ref.at[b, t, cols], g.astype(dx_ref.dtype), mask=mask)
    plgpu.store(da_ref.at[b, t, cols], (g * h_prev).astype(da_ref.dtype), mask=mask)
    a = plgpu.load(a_ref.at[b, t, cols], mask=mask, other=0.0).astype(ACC_DTYPE)
    return a * g

  m = plgpu.load(dh_last_ref.at[b, cols], mask=mask, other=0.0)
  m = jax.lax.fori_loop(0, seq_len, step, m)
  plgpu.store(dh0_ref.at[b, cols], m, mask=mask)


def _grid(shape, blocks: BlockSizes) -> tuple[int, tuple[int, int]]:
  block_c = min(blocks.channels, pl.next_power_of_2(shape[2]))
  return block_c, (shape[0], pl.cdiv(shape[2], block_c))


def _params(blocks: BlockSizes) -> plgpu.CompilerParams:
  return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _fwd_call(x, a, h0, *, reverse: bool, blocks: BlockSizes, interpret: bool):
  block_c, grid = _grid(x.shape, blocks)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, block_c=block_c, reverse=reverse),
      grid=grid,
      out_shape=[_common.out_struct(x.shape, x.dtype, x), _common.out_struct(h0.shape, ACC_DTYPE, x)],
      compiler_params=_params(blocks),
      interpret=interpret,
      name="linear_scan_fwd_gpu",
  )(x, a, h0)


def _bwd_call(dy, a, y, h0, dh_last, *, reverse: bool, blocks: BlockSizes, interpret: bool):
  block_c, grid = _grid(dy.shape, blocks)
  return pl.pallas_call(
      functools.partial(_bwd_kernel, block_c=block_c, reverse=reverse),
      grid=grid,
      out_shape=[_common.out_struct(dy.shape, y.dtype, dy),
                 _common.out_struct(a.shape, a.dtype, dy),
                 _common.out_struct(h0.shape, ACC_DTYPE, dy)],
      compiler_params=_params(blocks),
      interpret=interpret,
      name="linear_scan_bwd_gpu",
  )(dy, a, y, h0, dh_last)


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
    block_sizes: channels per program and Triton launch parameters.
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    (y, h_last): y in x's dtype and shape; h_last float32 [batch, channels].
  """
  _common.check_operands(x, a, h0)
  _common.check_dtypes("pallas_gpu", SUPPORTED_DTYPES, x, a)
  return run(x, a, h0, reverse=reverse, block_sizes=block_sizes, interpret=interpret)
