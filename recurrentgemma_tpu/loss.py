"""Training objective: tied unembedding + cross-entropy (+ z-loss), fused and chunked over time.

`unembed_cross_entropy` never materialises the float32 logits of the whole batch. It walks the
sequence in chunks of `chunk` positions (all rows at once); per chunk it computes the logits, the
log-normaliser, the target logit and, because the objective is a weighted sum whose weights are
known in the forward pass, also the logits' gradient, which it immediately contracts into the
gradients of the activations and of the embedding table. The backward pass only scales those by
the incoming cotangent. On the CPU backend this turns several passes over a [B, T, V] float32
array in DRAM into cache-resident work per chunk, with exactly the matmuls of the unfused loss.

Only the first output (`total`) is differentiable; the metrics in the second are reported values
(their cotangents are ignored), which is how the train step uses them.
"""

import functools

import jax
import jax.numpy as jnp

# Aim for ~8 MiB of float32 logits per chunk: resident in a CPU's last-level cache.
_CHUNK_LOGITS = 2**21


def default_chunk(batch: int, seq_len: int, vocab: int) -> int:
  """The largest divisor of seq_len whose chunk of logits stays near _CHUNK_LOGITS elements."""
  target = max(1, _CHUNK_LOGITS // max(batch * vocab, 1))
  return max(d for d in range(1, min(target, seq_len) + 1) if seq_len % d == 0)


def unembed_cross_entropy(x_BTD: jax.Array, table_VD: jax.Array, targets_BT: jax.Array,
                          weights_BT: jax.Array, total_weight: jax.Array, *,
                          soft_cap: float = 0.0, z_loss: float = 0.0,
                          chunk: int | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """Weighted cross-entropy of the tied-unembedding logits, normalised by `total_weight`.

  Args:
    x_BTD: final (normed) activations, compute dtype.
    table_VD: the embedding table (logits = x @ table.T in float32).
    targets_BT: int target ids.
    weights_BT: float loss weights (0 = padding).
    total_weight: scalar the sums are divided by (the whole global batch's weight).
    soft_cap: if > 0, logits = soft_cap * tanh(logits / soft_cap), as in the model.
    z_loss: coefficient of the mean squared log-normaliser added to `total`.
    chunk: positions per chunk (a divisor of T); default `default_chunk`.

  Returns:
    (total, (ce, zl, accuracy)): total = ce + z_loss * zl; ce, zl and accuracy are weighted sums
    divided by total_weight. Only `total` carries gradients (to x_BTD and table_VD).
  """
  B, T, D = x_BTD.shape
  V = table_VD.shape[0]
  if table_VD.shape != (V, D):
    raise ValueError(f"table must be [vocab, {D}]; got {table_VD.shape=} for {x_BTD.shape=}")
  if targets_BT.shape != (B, T) or weights_BT.shape != (B, T):
    raise ValueError(f"targets and weights must be {(B, T)}; got {targets_BT.shape=} "
                     f"{weights_BT.shape=}")
  chunk = default_chunk(B, T, V) if chunk is None else chunk
  if chunk < 1 or T % chunk:
    raise ValueError(f"chunk={chunk} must be a positive divisor of the sequence length {T}")
  return _fused(x_BTD, table_VD, targets_BT, weights_BT.astype(jnp.float32),
                jnp.asarray(total_weight, jnp.float32), float(soft_cap), float(z_loss), chunk)


def _chunks(x, chunk):
  """[B, T, ...] -> [T / chunk, B, chunk, ...] (scan over the leading axis)."""
  B, T = x.shape[:2]
  return jnp.swapaxes(x.reshape((B, T // chunk, chunk) + x.shape[2:]), 0, 1)


def _unchunk(x):
  n, B, c = x.shape[:3]
  return jnp.swapaxes(x, 0, 1).reshape((B, n * c) + x.shape[3:])


def _forward_and_grads(x_BTD, table_VD, targets_BT, w_BT, total_weight, soft_cap, z_loss, chunk):
  """Sums (ce, zl, correct), d total / d x and d total / d table, one chunk of positions at a time."""
  V, D = table_VD.shape
  table = table_VD.astype(x_BTD.dtype)
  inv_total = 1.0 / total_weight

  def body(carry, inp):
    d_table, sums = carry
    x_c, t_c, w_c = inp  # [B, c, D], [B, c], [B, c]
    raw = jnp.einsum("bcd,vd->bcv", x_c, table, preferred_element_type=jnp.float32)
    if soft_cap:
      th = jnp.tanh(raw / soft_cap)
      logits = th * soft_cap
    else:
      logits = raw
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    lse = (m + jnp.log(s))[..., 0]
    # A comparison with the vocabulary index rather than a gather: it partitions with `vocab`.
    hit = jnp.arange(V, dtype=t_c.dtype) == t_c[..., None]
    target_logit = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    correct = (jnp.argmax(logits, axis=-1) == t_c).astype(jnp.float32)
    ce = lse - target_logit
    # d total / d logits = (w / W) (softmax - onehot) + z (w / W) 2 lse softmax.
    g_ce = w_c * inv_total
    g_p = g_ce * (1.0 + 2.0 * z_loss * lse)
    d_logits = (g_p / s[..., 0])[..., None] * e - jnp.where(hit, g_ce[..., None], 0.0)
    if soft_cap:
      d_logits = d_logits * (1.0 - th * th)
    d_logits = d_logits.astype(x_c.dtype)
    dx_c = jnp.einsum("bcv,vd->bcd", d_logits, table, preferred_element_type=jnp.float32)
    d_table = d_table + jnp.einsum("bcv,bcd->vd", d_logits, x_c, preferred_element_type=jnp.float32)
    sums = (sums[0] + jnp.sum(ce * w_c), sums[1] + jnp.sum(lse * lse * w_c),
            sums[2] + jnp.sum(correct * w_c))
    return (d_table, sums), dx_c.astype(x_c.dtype)

  zero = jnp.zeros((), jnp.float32)
  init = (jnp.zeros((V, D), jnp.float32), (zero, zero, zero))
  (d_table, sums), dx = jax.lax.scan(
      body, init, (_chunks(x_BTD, chunk), _chunks(targets_BT, chunk), _chunks(w_BT, chunk)))
  ce, zl, acc = (v * inv_total for v in sums)
  return (ce + z_loss * zl, (ce, zl, acc)), (_unchunk(dx), d_table.astype(table_VD.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused(x_BTD, table_VD, targets_BT, w_BT, total_weight, soft_cap, z_loss, chunk):
  out, _ = _forward_and_grads(x_BTD, table_VD, targets_BT, w_BT, total_weight, soft_cap, z_loss,
                              chunk)
  return out


def _fused_fwd(x_BTD, table_VD, targets_BT, w_BT, total_weight, soft_cap, z_loss, chunk):
  return _forward_and_grads(x_BTD, table_VD, targets_BT, w_BT, total_weight, soft_cap, z_loss,
                            chunk)


def _fused_bwd(soft_cap, z_loss, chunk, grads, cotangents):
  del soft_cap, z_loss, chunk
  dx, d_table = grads
  g_total = cotangents[0]
  # The metrics' cotangents are ignored (module docstring); weights, targets and the
  # normaliser get none.
  return ((dx * g_total.astype(dx.dtype)).astype(dx.dtype),
          (d_table * g_total.astype(d_table.dtype)).astype(d_table.dtype), None, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)
