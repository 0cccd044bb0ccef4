"""The recurrent block of Griffin / Hawk: Conv1D + RG-LRU branch times a GeLU branch.

RG-LRU (Griffin paper eqs. 1-4, in the reference code's log-space form):
  r_t = sigmoid(W_a x_t + b_a), i_t = sigmoid(W_x x_t + b_x)
  log a_t = -c * softplus(Lambda) * r_t                       (c = 8)
  h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)
At a document start the state is dropped (a_t := 0) and the sqrt factor skipped, exactly like the
reference, so a packed row equals its documents run alone. Gates are block-diagonal with
`num_gate_blocks` blocks, which are also the unit of model-parallel sharding (no communication).
"""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

import pallas_kernels
from recurrentgemma_tpu.model.config import ModelConfig
from recurrentgemma_tpu.model.layers import constrain, lecun_normal, param

LRU_C = 8.0  # the paper's c
SQRT_MAX_GRADIENT = 1000.0  # RecurrentGemma report: the sqrt's derivative is clipped at 1000
A_MIN, A_MAX = 0.9, 0.999  # the ring Lambda is initialised on (see `lambda_init`)
SCAN_AXES = ("batch", "length", "rnn")  # logical axes of the scan's operands


class Segments(NamedTuple):
  """Per-token packing information shared by every block of one forward pass."""

  segment_ids: jax.Array  # [B, T] int32, document number, 0 = padding
  positions: jax.Array  # [B, T] int32, position within the document (RoPE)
  doc_start: jax.Array  # [B, T] bool, state resets here
  doc_index: jax.Array  # [B, T] int32, cumulative count of doc starts in the row


class RecurrentCache(NamedTuple):
  rg_lru: jax.Array  # [B, R] float32 state
  conv: jax.Array  # [B, W - 1, R] last conv inputs


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sqrt_bound_derivative(x: jax.Array, max_gradient: float) -> jax.Array:
  """sqrt(x) whose derivative is clipped at max_gradient (sqrt' blows up at 0 in bfloat16)."""
  return jnp.sqrt(x)


def _sqrt_fwd(x, max_gradient):
  return jnp.sqrt(x), x


def _sqrt_bwd(max_gradient, x, g):
  # d sqrt(x)/dx = 1 / (2 sqrt(x)) <= max_gradient  <=>  x >= 1 / (4 max_gradient^2).
  x_floor = jnp.maximum(x, 1.0 / (4.0 * max_gradient**2))
  return (g / (2.0 * jnp.sqrt(x_floor)),)


sqrt_bound_derivative.defvjp(_sqrt_fwd, _sqrt_bwd)


def lambda_initializer(kind: str) -> nn.initializers.Initializer:
  """Initialises Lambda (stored so that a = exp(-softplus(Lambda))).

  'code' (default, the released checkpoints): a^2 ~ U[A_MIN^2, A_MAX^2], so a in [0.9, 0.999].
  'paper' (Griffin section 2.4): a^c ~ U[A_MIN, A_MAX].
  """

  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    if kind == "code":
      log_a = 0.5 * jnp.log(u * (A_MAX**2 - A_MIN**2) + A_MIN**2 + 1e-8)
    elif kind == "paper":
      log_a = jnp.log(u * (A_MAX - A_MIN) + A_MIN) / LRU_C
    else:
      raise ValueError(f"lambda_init={kind!r} must be 'code' or 'paper'")
    # softplus^{-1}(-log a) = log(exp(-log a) - 1); expm1 keeps precision for a close to 1.
    return jnp.log(jnp.expm1(-log_a)).astype(dtype)

  return init


def run_linear_scan(x_BTR: jax.Array, a_BTR: jax.Array, h0_BR: jax.Array | None, impl: str,
                    placement: pallas_kernels.ScanPlacement | None) -> tuple[jax.Array, jax.Array]:
  """The one place the model calls the scan; the sequence-parallel variant plugs in here."""
  x_BTR = constrain(x_BTR, SCAN_AXES)
  a_BTR = constrain(a_BTR, SCAN_AXES)
  if placement is None:
    return pallas_kernels.linear_scan(x_BTR, a_BTR, h0_BR, impl=impl)
  # Under a mesh the scan runs per shard (Mosaic kernels cannot be auto-partitioned); with time
  # sharded over `seq` the shards also exchange carries (pallas_kernels.sequence_parallel).
  return placement.scan(x_BTR, a_BTR, h0_BR, impl=impl)


class BlockDiagonalLinear(nn.Module):
  """The parameters of x -> x W + b with W block-diagonal: w [N, I, I] (N blocks, I = R/N), b [N, I].

  It returns them rather than applying them, so that `RGLRU` computes both of its gates in one pass
  (`block_diagonal_gates`, whose form depends on the platform).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    N, R = cfg.num_gate_blocks_, cfg.lru_width_
    I = R // N
    pd = cfg.parameter_dtype
    w = param(self, "w", lecun_normal(), (N, I, I), ("rnn_block", None, None), pd)
    b = param(self, "b", nn.initializers.zeros_init(), (N, I), ("rnn_block", None), pd)
    return w, b


def _gates_einsum(x_BTR, w_x, b_x, w_a, b_a):
  """Both gates as a block-batched einsum each: the form XLA partitions over `rnn_block`."""
  N, I, _ = w_x.shape
  x_BTNI = x_BTR.reshape(*x_BTR.shape[:-1], N, I)
  gates = [jnp.einsum("btni,nij->btnj", x_BTNI, w) + b for w, b in ((w_x, b_x), (w_a, b_a))]
  return tuple(g.reshape(x_BTR.shape) for g in gates)


def _gates_per_block(x_BTR, w_x, b_x, w_a, b_a):
  """Both gates as N plain [B*T, I] x [I, 2I] matmuls on column slices (CPU).

  The einsum's batch dimension N makes the CPU backend transpose x, the outputs and, for the
  weight gradient, x again into [N, I, B*T] around every gate; slices and plain matmuls avoid
  most of that, and the shared x slice serves both gates (interleaved A/B, docs/benchmarks.md, "Train step against the reference").
  """
  N, I, _ = w_x.shape
  w_NI2I = jnp.concatenate([w_x, w_a], axis=-1)
  outs = [x_BTR[..., n * I:(n + 1) * I] @ w_NI2I[n] for n in range(N)]
  gate_x = jnp.concatenate([o[..., :I] for o in outs], axis=-1) + b_x.reshape(N * I)
  gate_a = jnp.concatenate([o[..., I:] for o in outs], axis=-1) + b_a.reshape(N * I)
  return gate_x, gate_a


def block_diagonal_gates(x_BTR: jax.Array, w_x: jax.Array, b_x: jax.Array, w_a: jax.Array,
                         b_a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pre-activation input and decay gates x W + b (block-diagonal W [N, I, I], b [N, I]).

  Same values on every platform up to summation order. Slicing the `rnn` axis by block would
  add communication where `rnn` is sharded over `model`, so only the lowered CPU program uses the
  per-block form; TPU and GPU keep the einsum (only the lowered platform's branch is compiled).
  """
  return pallas_kernels.platform_dependent(x_BTR, w_x, b_x, w_a, b_a, cpu=_gates_per_block,
                                          default=_gates_einsum)


class RGLRU(nn.Module):
  """Real-Gated Linear Recurrent Unit; the recurrence runs in float32.

  Attributes:
    config: the model.
    scan_placement: where the scan's [batch, length, rnn] operands live on a mesh (built by the
      step builder from the mesh and rules), or None for the plain single-program scan.
  """

  config: ModelConfig
  scan_placement: pallas_kernels.ScanPlacement | None = None

  @nn.compact
  def __call__(self, x_BTR: jax.Array, seg: Segments,
               h0_BR: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    a_param = param(self, "a_param", lambda_initializer(cfg.lambda_init), (cfg.lru_width_,),
                    ("rnn",), cfg.parameter_dtype)
    cd = cfg.compute_dtype
    w_x, b_x = BlockDiagonalLinear(cfg, name="input_gate")()
    w_a, b_a = BlockDiagonalLinear(cfg, name="a_gate")()
    gate_x, gate_a = block_diagonal_gates(x_BTR.astype(cd), w_x.astype(cd), b_x.astype(cd),
                                          w_a.astype(cd), b_a.astype(cd))
    gate_x, gate_a = jax.nn.sigmoid(gate_x), jax.nn.sigmoid(gate_a)
    # Decay and normaliser in float32 even in bfloat16 runs: a is close to 1, where bfloat16
    # cannot tell 0.999 from 1 and sqrt(1 - a^2) loses all its digits.
    log_a = -LRU_C * gate_a.astype(jnp.float32) * jax.nn.softplus(a_param.astype(jnp.float32))
    a = jnp.exp(log_a)
    multiplier = sqrt_bound_derivative(1.0 - jnp.exp(2.0 * log_a), SQRT_MAX_GRADIENT)
    reset = seg.doc_start[..., None]
    multiplier = jnp.where(reset, 1.0, multiplier)
    a = jnp.where(reset, 0.0, a)
    x_in = (x_BTR * gate_x).astype(jnp.float32) * multiplier
    y_BTR, h_last = run_linear_scan(x_in, a, h0_BR, cfg.scan_impl, self.scan_placement)
    return y_BTR.astype(cfg.compute_dtype), h_last


def _conv_masks(doc_BT: jax.Array, W: int) -> list[jax.Array]:
  """masks[j][b, t]: input t - j exists and lies in t's document; [B, T, 1] bool each."""
  T = doc_BT.shape[1]
  doc_pad = jnp.pad(doc_BT, ((0, 0), (W - 1, 0)), constant_values=-1)
  return [(doc_pad[:, W - 1 - j:W - 1 - j + T] == doc_BT)[..., None] for j in range(W)]


@jax.custom_vjp
def causal_conv1d(x_BTR: jax.Array, w_WR: jax.Array, b_R: jax.Array,
                  doc_BT: jax.Array) -> jax.Array:
  """Depthwise causal convolution from a zero history that never crosses a document start.

  out[t] = b + sum_j [doc[t - j] == doc[t]] x[t - j] w[W - 1 - j]  (doc: `Segments.doc_index`).
  The hand-written backward pass is the same shifted multiply-adds run the other way plus one
  reduction per tap; autodiff of the slices and selects adds padded copies and transposes.
  """
  return _causal_conv1d(x_BTR, w_WR, b_R, doc_BT)


def _conv_with_history(x_ext, idx_ext, w, b, doc_BT):
  """out[t] = b + sum_j [idx_ext[t'] == doc[t]] x_ext[t'] w[W - 1 - j], t' = t + W - 1 - j: x_ext and
  idx_ext are the chunk's inputs and document indices after the W - 1 before it."""
  W, T = w.shape[0], doc_BT.shape[1]
  out = None
  for j in range(W):  # x[t - j] * w[W - 1 - j]
    start = W - 1 - j
    same_doc = (idx_ext[:, start:start + T] == doc_BT)[..., None]
    term = jnp.where(same_doc, x_ext[:, start:start + T], 0) * w[start]
    out = term if out is None else out + term
  return out + b


def _causal_conv1d(x, w, b, doc_BT):
  W = w.shape[0]
  return _conv_with_history(jnp.pad(x, ((0, 0), (W - 1, 0), (0, 0))),
                            jnp.pad(doc_BT, ((0, 0), (W - 1, 0)), constant_values=-1), w, b, doc_BT)


def _causal_conv1d_fwd(x, w, b, doc_BT):
  return _causal_conv1d(x, w, b, doc_BT), (x, w, doc_BT)


def _causal_conv1d_bwd(res, g):
  x, w, doc_BT = res
  W, T = w.shape[0], x.shape[1]
  x_pad = jnp.pad(x, ((0, 0), (W - 1, 0), (0, 0)))
  g_pad = jnp.pad(g, ((0, 0), (0, W - 1), (0, 0)))
  dx, dw = None, [None] * W
  for j, mask in enumerate(_conv_masks(doc_BT, W)):
    # out[t + j] received x[t] * w[W - 1 - j] wherever mask[t + j] holds.
    mask_ahead = jnp.pad(mask, ((0, 0), (0, W - 1), (0, 0)))[:, j:j + T]
    term = jnp.where(mask_ahead, g_pad[:, j:j + T], 0) * w[W - 1 - j]
    dx = term if dx is None else dx + term
    dw[W - 1 - j] = jnp.sum(jnp.where(mask, x_pad[:, W - 1 - j:W - 1 - j + T], 0) * g,
                            axis=(0, 1))
  return dx, jnp.stack(dw).astype(w.dtype), jnp.sum(g, axis=(0, 1)).astype(w.dtype), None


causal_conv1d.defvjp(_causal_conv1d_fwd, _causal_conv1d_bwd)


class Conv1D(nn.Module):
  """Depthwise causal convolution of temporal width W that never looks across a document start."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTR: jax.Array, seg: Segments,
               tail_BWR: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    W, R = cfg.conv_width, cfg.lru_width_
    cd = cfg.compute_dtype
    w_WR = param(self, "w", lecun_normal(0.01), (W, R), ("conv", "rnn"), cfg.parameter_dtype)
    b_R = param(self, "b", nn.initializers.zeros_init(), (R,), ("rnn",), cfg.parameter_dtype)
    B, T, _ = x_BTR.shape
    x = x_BTR.astype(cd)
    if tail_BWR is None:  # training and prefill: zero history
      out = causal_conv1d(x, w_WR.astype(cd), b_R.astype(cd), seg.doc_index)
      return out, jnp.pad(x, ((0, 0), (W - 1, 0), (0, 0)))[:, T:]  # the last W - 1 inputs
    # The cached W-1 inputs sit before the chunk with document index 0; any start inside the
    # chunk raises the index, which masks everything before it.
    x_ext = jnp.concatenate([tail_BWR.astype(cd), x], axis=1)  # [B, W-1+T, R]
    idx_ext = jnp.concatenate([jnp.zeros((B, W - 1), seg.doc_index.dtype), seg.doc_index], axis=1)
    out = _conv_with_history(x_ext, idx_ext, w_WR.astype(cd), b_R.astype(cd), seg.doc_index)
    new_tail = x_ext[:, -(W - 1):] if W > 1 else x_ext[:, :0]
    return out, new_tail


class RecurrentBlock(nn.Module):
  """linear_y -> GeLU  (x)  linear_x -> Conv1D -> RG-LRU, then linear_out."""

  config: ModelConfig
  scan_placement: pallas_kernels.ScanPlacement | None = None  # see RGLRU

  @nn.compact
  def __call__(self, x_BTD: jax.Array, seg: Segments,
               cache: RecurrentCache | None) -> tuple[jax.Array, RecurrentCache]:
    cfg = self.config
    D, R = cfg.width, cfg.lru_width_
    pd, cd = cfg.parameter_dtype, cfg.compute_dtype
    zeros = nn.initializers.zeros_init()
    wy = param(self, "linear_y_w", lecun_normal(), (D, R), ("embed", "rnn"), pd)
    by = param(self, "linear_y_b", zeros, (R,), ("rnn",), pd)
    wx = param(self, "linear_x_w", lecun_normal(), (D, R), ("embed", "rnn"), pd)
    bx = param(self, "linear_x_b", zeros, (R,), ("rnn",), pd)
    wo = param(self, "linear_out_w", lecun_normal(cfg.final_w_init_variance_scale), (R, D),
               ("rnn", "embed"), pd)
    bo = param(self, "linear_out_b", zeros, (D,), ("embed",), pd)
    x = x_BTD.astype(cd)
    y_BTR = jax.nn.gelu(jnp.einsum("btd,dr->btr", x, wy.astype(cd)) + by.astype(cd))
    y_BTR = constrain(y_BTR, ("batch", "length", "rnn"))
    u_BTR = jnp.einsum("btd,dr->btr", x, wx.astype(cd)) + bx.astype(cd)
    u_BTR = constrain(u_BTR, ("batch", "length", "rnn"))
    u_BTR, conv_tail = Conv1D(cfg, name="conv_1d")(
        u_BTR, seg, None if cache is None else cache.conv)
    u_BTR, h_last = RGLRU(cfg, self.scan_placement, name="rg_lru")(u_BTR, seg, None if cache is None else cache.rg_lru)
    out = jnp.einsum("btr,rd->btd", u_BTR * y_BTR, wo.astype(cd)) + bo.astype(cd)
    return out, RecurrentCache(rg_lru=h_last, conv=conv_tail)
