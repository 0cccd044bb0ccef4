"""Local attention memory is O(T x window): measured on a real TPU compile (CPU reports no temps)."""

import jax
import jax.numpy as jnp
import pytest

from recurrentgemma_tpu.model import attention


def _tpu_device():
  topologies = pytest.importorskip("jax.experimental.topologies")
  try:
    topology = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu")
  except Exception as e:  # no libtpu in this environment
    pytest.skip(f"no TPU compiler available: {e}")
  return topology.devices[0]


def _grad_temp_bytes(device, T, window, blockwise=True, B=1, H=8, K=128):
  """Temporary bytes of forward + backward of one local MQA attention, compiled for a TPU chip."""
  sharding = jax.sharding.SingleDeviceSharding(device)
  seg = jnp.ones((B, T), jnp.int32)

  def loss(q, k, v):
    return attention.blockwise_attention(q, k, v, seg, window).astype(jnp.float32).sum()

  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding)
          for s in ((B, T, H, K), (B, T, K), (B, T, K))]
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
@pytest.mark.tpu_compile
def test_local_attention_temp_memory_grows_linearly_in_length():
  device = _tpu_device()
  small = _grad_temp_bytes(device, T=2048, window=1024)
  large = _grad_temp_bytes(device, T=8192, window=1024)
  # 4x the tokens: about 4x the memory (a T x T mask or logits would be 16x).
  assert 3.5 <= large / small <= 4.5, (small, large)
