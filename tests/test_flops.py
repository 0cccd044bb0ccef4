"""The FLOP model (model/flops.py) against the model itself and the compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from recurrentgemma_tpu import model as model_lib
from recurrentgemma_tpu.model import attention
from recurrentgemma_tpu.model import flops
from sharding import hlo


@pytest.mark.parametrize("block_type, window, seq_len", [
    ("local_attention", 4, 23), ("local_attention", 8, 16), ("local_attention", 30, 23),
    ("global_attention", 4, 23),
])
def test_attended_keys_are_what_the_model_attends_to(block_type, window, seq_len):
  # With q = k = 0 every attended key gets the same weight, so with v = key position the output at t
  # is the mean position of the keys t attends to, t - (n_t - 1) / 2: that gives n_t.
  H, K = 2, 4
  q = jnp.zeros((1, seq_len, H, K))
  k = jnp.zeros((1, seq_len, K))
  v = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.float32)[None, :, None], (1, seq_len, K))
  out = attention.blockwise_attention(q, k, v, jnp.ones((1, seq_len), jnp.int32),
                                      None if block_type == "global_attention" else window)
  t = np.arange(seq_len)
  n_t = 2 * (t - np.asarray(out)[0, :, 0, 0]) + 1
  assert np.allclose(n_t, np.round(n_t), atol=1e-4)
  assert flops.attended_keys(block_type, window, seq_len) == pytest.approx(n_t.mean(), rel=1e-6)


def _computed_attention_flops(mc, seq_len: int) -> float:
  """Score and value products the blockwise implementation computes per row (masked ones too)."""
  total = 0.0
  for block_type in mc.block_types:
    if block_type == "recurrent":
      continue
    w = mc.attention_window
    chunk, keys = ((seq_len, seq_len) if block_type == "global_attention" or w >= seq_len - 1
                   else (w, 2 * w))
    padded = -(-seq_len // chunk) * chunk
    total += 2 * 2 * mc.num_heads * mc.head_dim_ * padded * keys
  return total


@pytest.mark.slow
@pytest.mark.parametrize("family", ["griffin", "hawk", "mqa"])
def test_flop_model_matches_compiled_matmuls(family):
  """Forward + backward of the model compiled on CPU: its matmul FLOPs (sharding/hlo.py) are exactly
  3 x the model's weight FLOPs plus 3 x the attention products the blockwise kernel computes."""
  mc = model_lib.ModelConfig.from_config(dict(
      base.model(), vocab_size=256, width=64, num_layers=3, block_pattern=family, num_heads=2,
      head_dim=32, lru_width=96, num_gate_blocks=4, attention_window=8, remat="none"))
  B, T = 2, 30
  params = jax.eval_shape(lambda: model_lib.init_params(mc, jax.random.key(0)))

  def forward_backward(p, tokens, cotangent):
    out, vjp = jax.vjp(lambda p: model_lib.apply(p, mc, tokens), p)
    return out, vjp(cotangent)  # the logits are returned so the forward output matmul is kept

  compiled = jax.jit(forward_backward).lower(
      params, jax.ShapeDtypeStruct((B, T), jnp.int32),
      jax.ShapeDtypeStruct((B, T, mc.vocab_size), jnp.float32)).compile()
  count = hlo.matmul_flops(compiled.as_text())
  assert count.exact, count.loops
  model = flops.forward_flops_per_token(mc, T)
  expected = 3 * (B * T * model.weights + B * _computed_attention_flops(mc, T))
  assert count.flops == pytest.approx(expected, rel=1e-9)
  assert flops.training_flops_per_token(mc, T) == pytest.approx(3 * (model.weights + model.attention))
  if family == "hawk":
    assert model.attention == 0


def test_param_counts_split_off_the_embedding():
  mc = model_lib.ModelConfig.from_config(dict(base.model(), vocab_size=256, width=64, num_layers=3,
                                              num_heads=2, lru_width=96))
  total, non_embedding = flops.param_counts(mc)
  assert total - non_embedding == 256 * 64
  leaves = jax.tree.leaves(jax.eval_shape(lambda: model_lib.init_params(mc, jax.random.key(0))))
  assert total == sum(int(np.prod(x.shape)) for x in leaves)
