"""The fused, chunked unembedding + cross-entropy against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrentgemma_tpu import loss as loss_lib

jax.config.update("jax_enable_x64", False)

def _reference(x, table, targets, weights, total, soft_cap, z_loss):
  """float64: (total, ce, zl, acc) and d total / d (x, table), by hand."""
  x, table, w = (np.asarray(a, np.float64) for a in (x, table, weights))
  raw = np.einsum("btd,vd->btv", x, table)
  th = np.tanh(raw / soft_cap) if soft_cap else None
  logits = th * soft_cap if soft_cap else raw
  m = logits.max(-1, keepdims=True)
  p = np.exp(logits - m)
  s = p.sum(-1, keepdims=True)
  p /= s
  lse = (m + np.log(s))[..., 0]
  onehot = np.eye(table.shape[0])[np.asarray(targets)]
  ce = lse - (logits * onehot).sum(-1)
  acc = (logits.argmax(-1) == np.asarray(targets)).astype(np.float64)
  ce_s, zl_s, acc_s = ((v * w).sum() / total for v in (ce, lse**2, acc))
  g = (w / total)[..., None]
  d_logits = g * (p - onehot) + z_loss * g * 2 * lse[..., None] * p
  if soft_cap:
    d_logits = d_logits * (1 - th**2)
  dx = np.einsum("btv,vd->btd", d_logits, table)
  d_table = np.einsum("btv,btd->vd", d_logits, x)
  return (ce_s + z_loss * zl_s, ce_s, zl_s, acc_s), (dx, d_table)

@pytest.mark.parametrize("soft_cap,z_loss,chunk", [(0.0, 0.0, None), (0.0, 1e-2, 3),
                                                    (30.0, 1e-3, 2), (5.0, 0.0, 6)])
def test_values_and_gradients_match_float64(soft_cap, z_loss, chunk):
  B, T, D, V = 2, 6, 8, 11
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (B, T, D), jnp.float32)
  table = jax.random.normal(k[1], (V, D), jnp.float32) * 2.0  # large logits: the cap matters
  targets = jax.random.randint(k[2], (B, T), 0, V)
  weights = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)  # some padding
  total = jnp.maximum(weights.sum(), 1.0) + 2.0  # a normaliser other than this batch's weight

  def f(x, table):
    return loss_lib.unembed_cross_entropy(x, table, targets, weights, total, soft_cap=soft_cap,
                                          z_loss=z_loss, chunk=chunk)

  (tot, (ce, zl, acc)), (dx, d_table) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, table)
  (r_tot, r_ce, r_zl, r_acc), (r_dx, r_dt) = _reference(x, table, targets, weights, total,
                                                         soft_cap, z_loss)
  np.testing.assert_allclose([tot, ce, zl, acc], [r_tot, r_ce, r_zl, r_acc], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dx, r_dx, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(d_table, r_dt, rtol=1e-4, atol=1e-6)

def test_cotangent_scales_gradients():
  """The backward pass scales by the incoming cotangent (e.g. a loss multiplied by 3)."""
  B, T, D, V = 1, 4, 4, 7
  x = jax.random.normal(jax.random.key(1), (B, T, D))
  table = jax.random.normal(jax.random.key(2), (V, D))
  targets = jnp.array([[1, 2, 3, 4]])
  weights = jnp.ones((B, T))

  def f(x, scale):
    return scale * loss_lib.unembed_cross_entropy(x, table, targets, weights, 4.0, chunk=2)[0]

  np.testing.assert_allclose(jax.grad(f)(x, 3.0), 3.0 * jax.grad(f)(x, 1.0), rtol=1e-6)

def test_chunk_must_divide_time():
  x = jnp.zeros((1, 6, 4))
  with pytest.raises(ValueError, match="chunk=4"):
    loss_lib.unembed_cross_entropy(x, jnp.zeros((5, 4)), jnp.zeros((1, 6), jnp.int32),
                                   jnp.ones((1, 6)), 6.0, chunk=4)

def test_default_chunk_keeps_logits_small():
  assert loss_lib.default_chunk(4, 1024, 4096) == 128  # 4 x 128 x 4096 floats = 8 MiB
  assert loss_lib.default_chunk(1, 13, 256_000) == 1  # 13 is prime; 8 positions would fit
  assert loss_lib.default_chunk(2, 6, 3) == 6
