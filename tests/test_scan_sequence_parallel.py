"""Sequence-parallel scan on 8 CPU devices equals the single-device scan and the float64 reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import pallas_kernels
from pallas_kernels import reference


def _mesh(shape, names):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  return Mesh(np.asarray(jax.devices()[:8]).reshape(shape), names)


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  a = rng.uniform(0.6, 1.0, size=shape).astype(np.float32)
  a[rng.random(shape) < 0.05] = 0.0  # state resets inside shards and at shard boundaries
  a[:, shape[1] // 2] = 0.0
  h0 = rng.normal(size=(shape[0], shape[2])).astype(np.float32)
  dy = rng.normal(size=shape).astype(np.float32)
  dh_last = rng.normal(size=(shape[0], shape[2])).astype(np.float32)
  return x, a, h0, dy, dh_last


def _value_and_grads(scan, x, a, h0, dy, dh_last):
  def loss(x, a, h0):
    y, h_last = scan(x, a, h0)
    return jnp.sum(y * dy) + jnp.sum(h_last * dh_last), (y, h_last)
  grads, (y, h_last) = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(x, a, h0)
  return (y, h_last), grads


@pytest.mark.parametrize("impl,reverse", [
    ("xla_linear", False),
    ("xla_linear", True),
    ("pallas_tpu", True),
    ("pallas_gpu", False),
])
def test_sharded_equals_single_device(impl, reverse):
  mesh = _mesh((2, 4), ("data", "seq"))
  x, a, h0, dy, dh_last = _inputs((4, 64, 130))
  spec = NamedSharding(mesh, P("data", "seq", None))
  xs, as_ = jax.device_put(x, spec), jax.device_put(a, spec)
  sharded = functools.partial(
      pallas_kernels.sequence_parallel_linear_scan, mesh=mesh, axis_name="seq", batch_axes="data",
      reverse=reverse, impl=impl, interpret=True)
  single = functools.partial(pallas_kernels.linear_scan, reverse=reverse, impl="xla_linear")

  (y, h_last), grads = _value_and_grads(sharded, xs, as_, h0, dy, dh_last)
  (y1, h1), grads1 = _value_and_grads(single, x, a, h0, dy, dh_last)

  assert y.sharding.spec == P("data", "seq", None)
  np.testing.assert_allclose(y, y1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h_last, h1, rtol=1e-5, atol=1e-5)
  for name, g, g1 in zip(("dx", "da", "dh0"), grads, grads1):
    np.testing.assert_allclose(g, g1, rtol=1e-5, atol=1e-5, err_msg=name)
  # And both against the float64 ground truth.
  y_ref, h_ref = reference.numpy_linear_scan(x, a, h0, reverse=reverse)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h_last, h_ref, rtol=1e-5, atol=1e-5)
  for name, g, g_ref in zip(("dx", "da", "dh0"), grads,
                            reference.numpy_linear_scan_vjp(x, a, h0, dy, dh_last, reverse=reverse)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_eight_sequence_shards_with_sharded_channels_and_no_h0():
  mesh = _mesh((8, 1), ("seq", "model"))
  x, a, _, dy, dh_last = _inputs((2, 40, 256), seed=3)
  sharded = functools.partial(pallas_kernels.sequence_parallel_linear_scan, mesh=mesh, axis_name="seq",
                              channel_axes="model", impl="xla_linear")
  y, h_last = jax.jit(lambda x, a: sharded(x, a))(x, a)
  y_ref, h_ref = reference.numpy_linear_scan(x, a)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h_last, h_ref, rtol=1e-5, atol=1e-5)


def test_unsharded_time_axis_needs_no_communication():
  mesh = _mesh((4, 2), ("data", "model"))
  x, a, h0, _, _ = _inputs((4, 24, 64), seed=4)
  fn = jax.jit(functools.partial(pallas_kernels.sequence_parallel_linear_scan, mesh=mesh,
                                 axis_name=None, batch_axes="data", channel_axes="model",
                                 impl="pallas_tpu", interpret=True))
  y, h_last = fn(x, a, h0)
  assert y.sharding.spec == P("data", None, "model")
  y_ref, h_ref = reference.numpy_linear_scan(x, a, h0)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h_last, h_ref, rtol=1e-5, atol=1e-5)


def test_abstract_mesh_and_time_over_two_mesh_axes():
  # The abstract mesh of the mesh installed while tracing (a ScanPlacement may carry either kind);
  # time split 8 ways over two mesh axes.
  mesh = _mesh((2, 4), ("data", "seq"))
  x, a, h0, _, _ = _inputs((2, 64, 32), seed=5)

  @jax.jit
  def fn(x, a, h0):
    return pallas_kernels.sequence_parallel_linear_scan(
        x, a, h0, mesh=jax.sharding.get_abstract_mesh(), axis_name=("data", "seq"),
        impl="xla_linear", reverse=True)

  with jax.set_mesh(mesh):
    y, h_last = fn(x, a, h0)
  y_ref, h_ref = reference.numpy_linear_scan(x, a, h0, reverse=True)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h_last, h_ref, rtol=1e-5, atol=1e-5)


def test_bad_mesh_arguments():
  mesh = _mesh((2, 4), ("data", "seq"))
  x = jnp.ones((2, 30, 8))
  scan = functools.partial(pallas_kernels.sequence_parallel_linear_scan, mesh=mesh)
  with pytest.raises(ValueError, match=r"x.shape\[1\]=30 must be divisible by the 4 shards"):
    scan(x, x, axis_name="seq")
  with pytest.raises(ValueError, match="axis_name='time': 'time' is not an axis of the mesh"):
    scan(x, x, axis_name="time")
  with pytest.raises(ValueError, match="a mesh axis may shard only one dimension"):
    scan(x, x, axis_name="seq", batch_axes="seq")
