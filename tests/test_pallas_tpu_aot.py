"""The TPU kernels compile with the real TPU compiler (libtpu) for TPU topologies, on this CPU host."""

import os
import re

# Other processes on this host (parallel test runs) may hold libtpu's lockfile; compiling ahead of
# time touches no TPU, so sharing libtpu is safe. Must be set before libtpu initialises.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import pallas_kernels  # noqa: E402
from pallas_kernels import tpu  # noqa: E402

TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2")


def _devices(topology: str):
  try:
    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
  except Exception as e:  # libtpu missing or unusable: the test cannot run here.
    pytest.skip(f"no TPU topology {topology!r} on this host: {e}")


def _kernel_names(compiled_text: str) -> list[str]:
  """Names of the Mosaic custom calls in a compiled TPU program."""
  calls = [line for line in compiled_text.splitlines()
           if 'custom_call_target="tpu_custom_call"' in line]
  return sorted(re.search(r"%(\S+?)(?:\.\d+)? = ", line).group(1) for line in calls)


@pytest.mark.parametrize("topology,reverse", [(t, False) for t in TOPOLOGIES] + [("v5p:2x2x1", True)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_and_backward_compile_to_mosaic(topology, reverse, dtype):
  sharding = jax.sharding.SingleDeviceSharding(_devices(topology)[0])
  # Odd sizes: time and channels are not multiples of the blocks.
  x = jax.ShapeDtypeStruct((3, 300, 1100), dtype, sharding=sharding)
  h0 = jax.ShapeDtypeStruct((3, 1100), jnp.float32, sharding=sharding)

  def loss(x, a, h0):
    y, h_last = pallas_kernels.linear_scan(x, a, h0, reverse=reverse, impl="auto")
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h_last)

  compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, h0).compile()
  names = _kernel_names(compiled.as_text())
  # "auto" picked the Pallas kernels for TPU: one forward and one backward Mosaic kernel.
  assert len(names) == 2 and any("linear_scan_fwd" in n for n in names) and any(
      "linear_scan_bwd" in n for n in names), names


def test_no_relayout_copies_around_kernel():
  # The kernel takes [B, T, C] in XLA's default TPU layout, so XLA must not copy operands or results
  # (the lane-group layout this replaced needed a relayout copy of each; docs/kernels.md).
  sharding = jax.sharding.SingleDeviceSharding(_devices("v5p:2x2x1")[0])
  shape = (4, 512, 1024)
  u = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)

  def loss(u, v):
    a = jax.nn.sigmoid(v)  # producers and consumers are ordinary fusions, as in the RG-LRU
    y, _ = tpu.linear_scan(u * a, a)
    return jnp.sum((y * u).astype(jnp.float32))

  text = jax.jit(jax.grad(loss, (0, 1))).lower(u, u).compile().as_text()
  full = re.compile(r"= bf16\[4,512,1024\]\{[^}]*\} copy\(")
  copies = [line.strip()[:160] for line in text.splitlines() if full.search(line)]
  assert not copies, copies
  assert len(_kernel_names(text)) == 2


def test_sequence_parallel_compiles_per_shard_kernel():
  devices = _devices("v5p:2x2x1")
  mesh = Mesh(np.asarray(devices).reshape(2, 2), ("data", "seq"))
  spec = NamedSharding(mesh, P("data", "seq", None))
  x = jax.ShapeDtypeStruct((4, 512, 256), jnp.bfloat16, sharding=spec)

  def loss(x, a):
    y, h_last = pallas_kernels.sequence_parallel_linear_scan(
        x, a, mesh=mesh, axis_name="seq", batch_axes="data", impl="pallas_tpu")
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h_last)

  compiled = jax.jit(jax.grad(loss, (0, 1))).lower(x, x).compile()
  text = compiled.as_text()
  names = _kernel_names(text)
  # Two forward scans (local carry, then the rescan from the exact carry) and their backward kernels.
  assert sum("linear_scan_fwd" in n for n in names) >= 2, names
  assert sum("linear_scan_bwd" in n for n in names) >= 1, names
  # The kernels see per-device shapes: [2, 256, 256] of the global [4, 512, 256].
  assert re.search(r"bf16\[2,256,256\]\{[^}]*\} custom-call\(", text) or "bf16[2,256,256]" in text
  assert "all-gather" in text


def test_batch_and_channel_sharded_kernel_compiles_through_wrapper():
  # Mosaic kernels have no SPMD partitioning rule: called directly on sharded operands under jit,
  # lowering fails ("Mosaic kernels cannot be automatically partitioned"). The wrapper with
  # axis_name=None is the shard_map the model uses for data / model sharded activations.
  devices = _devices("v5p:2x2x1")
  mesh = Mesh(np.asarray(devices).reshape(2, 2), ("data", "model"))
  x = jax.ShapeDtypeStruct((8, 512, 1024), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P("data", None, "model")))

  def loss(x, a):
    y, _ = pallas_kernels.sequence_parallel_linear_scan(
        x, a, mesh=mesh, axis_name=None, batch_axes="data", channel_axes="model")
    return jnp.sum(y.astype(jnp.float32))

  text = jax.jit(jax.grad(loss, (0, 1))).lower(x, x).compile().as_text()
  assert len(_kernel_names(text)) == 2
  assert "bf16[4,512,512]" in text  # per-device blocks of the [8, 512, 1024] operands
  assert "all-gather" not in text and "all-reduce" not in text


def test_auto_falls_back_to_xla_for_float16_on_tpu():
  sharding = jax.sharding.SingleDeviceSharding(_devices("v5e:2x2")[0])
  x = jax.ShapeDtypeStruct((2, 64, 256), jnp.float16, sharding=sharding)
  text = jax.jit(lambda x, a: pallas_kernels.linear_scan(x, a)[0]).lower(x, x).compile().as_text()
  assert not _kernel_names(text)
  with pytest.raises(ValueError, match="got x.dtype=float16"):
    pallas_kernels.linear_scan(jnp.ones((1, 4, 8), jnp.float16), jnp.ones((1, 4, 8), jnp.float16),
                               impl="pallas_tpu")
