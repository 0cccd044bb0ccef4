"""Multi-query attention (one K/V head) with RoPE: local sliding-window and global.

Training / full-sequence path: blockwise. The sequence is cut into chunks of C = window tokens and
each query chunk attends to its own chunk and the one before, which covers the window exactly
(a query at t sees keys t - window .. t, like the reference). Logits are [B, H, T, 2C] instead of
the reference's [B, H, T, T]: memory O(T x window). Global attention is the same code with one
chunk of the whole sequence.

Decoding path: keys and values of the last S tokens live in a ring buffer (slot = position % S,
S = window for local layers); a chunk of new tokens attends to buffer + itself.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recurrentgemma_tpu.model.config import GLOBAL_ATTENTION, ModelConfig
from recurrentgemma_tpu.model.layers import constrain, lecun_normal, param
from recurrentgemma_tpu.model.rglru import Segments

_NEG_INF = -2.3819763e38  # the reference's mask value; finite so fully masked rows stay finite


class AttentionCache(NamedTuple):
  k: jax.Array  # [B, S, K] ring buffer of roped keys
  v: jax.Array  # [B, S, K]


def apply_rope(x_BTHK: jax.Array, positions_BT: jax.Array, rope_dims: int,
               base: float) -> jax.Array:
  """Rotates the first `rope_dims` dims of each head (rotate-half pairing), leaves the rest."""
  if rope_dims == 0:
    return x_BTHK
  x_rope, x_pass = x_BTHK[..., :rope_dims], x_BTHK[..., rope_dims:]
  freq_exponents = 2.0 * jnp.arange(rope_dims // 2) / rope_dims
  inv_freq = 1.0 / (base**freq_exponents)
  angles = positions_BT[:, :, None, None] * inv_freq  # [B, T, 1, rope_dims / 2]
  sin = jnp.sin(angles).astype(x_BTHK.dtype)
  cos = jnp.cos(angles).astype(x_BTHK.dtype)
  first, second = jnp.split(x_rope, 2, axis=-1)
  return jnp.concatenate([first * cos - second * sin, second * cos + first * sin, x_pass], -1)


def _masked_probs(q, k, mask, scale, q_spec, k_spec, l_spec):
  """float32 softmax over the last axis of the masked, scaled logits q k^T."""
  logits = jnp.einsum(f"{q_spec},{k_spec}->{l_spec}", q, k,
                      preferred_element_type=jnp.float32) * scale
  return jax.nn.softmax(jnp.where(mask, logits, _NEG_INF), axis=-1)


def _softmax_attend(q, k, v, mask, scale, out_dtype, q_spec, k_spec, l_spec, o_spec):
  probs = _masked_probs(q, k, mask, scale, q_spec, k_spec, l_spec).astype(out_dtype)
  return jnp.einsum(f"{l_spec},{k_spec}->{o_spec}", probs, v)


# Query chunk of the causal (window >= T) path; at most _MAX_CAUSAL_CHUNKS chunks per sequence.
CAUSAL_CHUNK = 256
_MAX_CAUSAL_CHUNKS = 16


@jax.custom_vjp
def strip_attend(q_BCHK: jax.Array, k_BSK: jax.Array, v_BSK: jax.Array,
                 mask_BC1S: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(K), masked) v for one query chunk and its key strip, logits [B, C, H, S].

  Its backward pass keeps only the probabilities p and the output and uses the softmax identity
  sum_s p_s dp_s = dout . out, so it makes one elementwise pass over [B, C, H, S] to form the
  logits' gradient; autodiff through the mask, the max and the division makes several.
  """
  K = q_BCHK.shape[-1]
  return _softmax_attend(q_BCHK, k_BSK, v_BSK, mask_BC1S, K**-0.5, q_BCHK.dtype, "bthk", "bsk",
                         "bths", "bthk")


def _strip_attend_fwd(q, k, v, mask):
  # `_softmax_attend`'s ops, so values equal the undifferentiated call.
  probs = _masked_probs(q, k, mask, q.shape[-1]**-0.5, "bthk", "bsk", "bths")
  out = jnp.einsum("bths,bsk->bthk", probs.astype(q.dtype), v)
  return out, (q, k, v, mask, probs, out)


def _strip_attend_bwd(res, d_out):
  q, k, v, mask, probs, out = res
  dv = jnp.einsum("bths,bthk->bsk", probs.astype(q.dtype), d_out)
  d_probs = jnp.einsum("bthk,bsk->bths", d_out, v, preferred_element_type=jnp.float32)
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = jnp.where(mask, probs * (d_probs - row), 0.0) * q.shape[-1]**-0.5
  d_logits = d_logits.astype(q.dtype)
  dq = jnp.einsum("bths,bsk->bthk", d_logits, k)
  dk = jnp.einsum("bths,bthk->bsk", d_logits, q)
  return dq, dk, dv, None


strip_attend.defvjp(_strip_attend_fwd, _strip_attend_bwd)


def causal_strip_attention(q_BTHK: jax.Array, k_BTK: jax.Array, v_BTK: jax.Array,
                           segment_ids_BT: jax.Array) -> jax.Array:
  """Causal MQA within documents, computing only keys at or before each query chunk.

  Query chunk i (C positions) attends to the strip of keys [0, (i + 1) C): a softmax over exactly
  the keys the full T x T mask would keep plus the diagonal block's upper triangle, so with n
  chunks the logits are (n + 1) / 2n of the T x T ones (62.5% at n = 4) and no key a query cannot
  see contributes a term. Same values as the one-chunk path up to summation order.
  """
  B, T, H, K = q_BTHK.shape
  chunk = max(CAUSAL_CHUNK, -(-T // _MAX_CAUSAL_CHUNKS))
  pos = np.arange(T)
  outs = []
  for lo in range(0, T, chunk):
    hi = min(T, lo + chunk)
    causal = pos[lo:hi, None] >= pos[None, :hi]  # [C, S], static
    mask = causal[None, :, None] & (segment_ids_BT[:, lo:hi, None, None] ==
                                    segment_ids_BT[:, None, None, :hi])  # [B, C, 1, S]
    # Logits [B, C, H, S]: with one shared K/V head the (query, head) rows are q's own memory
    # order, so no transpose of q, the logits or the output is needed around the two matmuls.
    outs.append(strip_attend(q_BTHK[:, lo:hi], k_BTK[:, :hi], v_BTK[:, :hi], mask))
  return jnp.concatenate(outs, axis=1)


def blockwise_attention(q_BTHK: jax.Array, k_BTK: jax.Array, v_BTK: jax.Array,
                        segment_ids_BT: jax.Array, window: int | None) -> jax.Array:
  """Causal MQA within documents and (if window) within `window` positions; O(T x window) memory.

  A query at index t attends to keys s with s <= t, t - s <= window, same segment id.
  """
  B, T, H, K = q_BTHK.shape
  scale = K**-0.5
  if (window is None or window >= T - 1) and T > CAUSAL_CHUNK:
    return causal_strip_attention(q_BTHK, k_BTK, v_BTK, segment_ids_BT)
  if window is None or window >= T - 1:
    chunk, lookback = T, 0  # one chunk: the window condition never bites
  else:
    chunk, lookback = window, 1  # keys of chunk i: chunks i-1 and i cover [t - window, t]
  n = -(-T // chunk)
  pad = n * chunk - T
  # Padded tokens get segment -1, which no real token (segment >= 0) matches.
  seg = jnp.pad(segment_ids_BT, ((0, 0), (0, pad)), constant_values=-1)
  q = jnp.pad(q_BTHK, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, n, chunk, H, K)
  k = jnp.pad(k_BTK, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, K)
  v = jnp.pad(v_BTK, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, K)
  q_seg = seg.reshape(B, n, chunk)
  q_idx = jnp.arange(n * chunk).reshape(n, chunk)

  def with_lookback(x, fill):
    """[B, n, C, ...] -> [B, n, (lookback + 1) * C, ...]: each chunk preceded by its previous."""
    if lookback == 0:
      return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (lookback, 0)
    xp = jnp.pad(x, widths, constant_values=fill)
    return jnp.concatenate([xp[:, j:j + n] for j in range(lookback + 1)], axis=2)

  k_s = with_lookback(k, 0)
  v_s = with_lookback(v, 0)
  k_seg = with_lookback(q_seg, -2)  # -2: the chunk before the first one does not exist
  k_idx = with_lookback(q_idx[None], -1)[0]  # [n, S]
  diff = q_idx[:, :, None] - k_idx[:, None, :]  # [n, C, S]
  mask = diff >= 0
  if window is not None:
    mask &= diff <= window
  mask = mask[None, :, None] & (q_seg[:, :, None, :, None] == k_seg[:, :, None, None, :])
  out = _softmax_attend(q, k_s, v_s, mask, scale, q_BTHK.dtype, "bnqhk", "bnsk", "bnhqs",
                        "bnqhk")
  return out.reshape(B, n * chunk, H, K)[:, :T]


def cached_attention(q_BTHK: jax.Array, k_BTK: jax.Array, v_BTK: jax.Array,
                     cache: AttentionCache, num_tokens_B: jax.Array,
                     window: int | None) -> tuple[jax.Array, AttentionCache]:
  """Attends a chunk of new tokens to the ring buffer plus itself; returns the updated buffer.

  `num_tokens_B` counts the tokens already in the row, so the chunk's positions are
  num_tokens + [0, T). One document per row.
  """
  B, T, H, K = q_BTHK.shape
  S = cache.k.shape[1]
  q_pos = num_tokens_B[:, None] + jnp.arange(T)[None]  # [B, T]
  # The position each slot holds: the latest p < num_tokens with p % S == slot.
  slots = jnp.arange(S)[None]
  last = num_tokens_B[:, None] - 1
  slot_pos = last - jnp.mod(last - slots, S)  # [B, S]; negative when the slot is still empty
  k_pos = jnp.concatenate([slot_pos, q_pos], axis=1)  # [B, S + T]
  diff = q_pos[:, :, None] - k_pos[:, None, :]
  mask = (diff >= 0) & (k_pos[:, None, :] >= 0)
  if window is not None:
    mask &= diff <= window
  keys = jnp.concatenate([cache.k.astype(k_BTK.dtype), k_BTK], axis=1)
  values = jnp.concatenate([cache.v.astype(v_BTK.dtype), v_BTK], axis=1)
  out = _softmax_attend(q_BTHK, keys, values, mask[:, None], K**-0.5, q_BTHK.dtype, "bthk",
                        "bsk", "bhts", "bthk")
  # Only the last S new tokens survive in the buffer; their slots are distinct.
  keep = min(T, S)
  new_pos = q_pos[:, T - keep:]
  rows = jnp.arange(B)[:, None]
  new_k = cache.k.at[rows, new_pos % S].set(k_BTK[:, T - keep:].astype(cache.k.dtype))
  new_v = cache.v.at[rows, new_pos % S].set(v_BTK[:, T - keep:].astype(cache.v.dtype))
  return out, AttentionCache(k=new_k, v=new_v)


class AttentionBlock(nn.Module):
  """MQA: H query heads, one shared key/value head of size K; RoPE on a fraction of each head."""

  config: ModelConfig
  block_type: str

  @nn.compact
  def __call__(self, x_BTD: jax.Array, seg: Segments, cache: AttentionCache | None,
               num_tokens_B: jax.Array | None) -> tuple[jax.Array, AttentionCache | None]:
    cfg = self.config
    D, H, K = cfg.width, cfg.num_heads, cfg.head_dim_
    pd, cd = cfg.parameter_dtype, cfg.compute_dtype
    wq = param(self, "q_w", lecun_normal(in_axis=0, out_axis=(1, 2)), (D, H, K),
               ("embed", "heads", "head_dim"), pd)
    wk = param(self, "k_w", lecun_normal(), (D, K), ("embed", "kv"), pd)
    wv = param(self, "v_w", lecun_normal(), (D, K), ("embed", "kv"), pd)
    wo = param(self, "out_w",
               lecun_normal(cfg.final_w_init_variance_scale, in_axis=(0, 1), out_axis=2),
               (H, K, D), ("heads", "head_dim", "embed"), pd)
    bo = param(self, "out_b", nn.initializers.zeros_init(), (D,), ("embed",), pd)
    x = x_BTD.astype(cd)
    q = jnp.einsum("btd,dhk->bthk", x, wq.astype(cd))
    k = jnp.einsum("btd,dk->btk", x, wk.astype(cd))
    v = jnp.einsum("btd,dk->btk", x, wv.astype(cd))
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    q = apply_rope(q, seg.positions, cfg.rope_dims, cfg.rope_base)
    k = apply_rope(k[:, :, None], seg.positions, cfg.rope_dims, cfg.rope_base)[:, :, 0]
    window = None if self.block_type == GLOBAL_ATTENTION else cfg.attention_window
    if cache is None:
      # doc_index refines segment_ids (it also splits where a position restarts at 0).
      out, new_cache = blockwise_attention(q, k, v, seg.doc_index, window), None
    else:
      out, new_cache = cached_attention(q, k, v, cache, num_tokens_B, window)
    out = constrain(out, ("batch", "length", "heads", "head_dim"))
    y = jnp.einsum("bthk,hkd->btd", out, wo.astype(cd)) + bo.astype(cd)
    return y, new_cache
