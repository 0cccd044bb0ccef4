"""linear_scan: every implementation against the float64 NumPy reference, values and gradients.

Pallas kernels run in interpret mode here (no accelerator); test_pallas_tpu_aot.py compiles the TPU
kernel with the real TPU compiler.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import gpu, reference, tpu

IMPLS = ("xla_linear", "xla_associative", "pallas_tpu", "pallas_gpu", "auto")
# Relative to the largest reference magnitude of each output.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# Small TPU blocks so these shapes cross time, batch and channel block edges (partial blocks too).
SMALL_TPU_BLOCKS = tpu.BlockSizes(batch=2, time=16, channel_tiles=1)


def _inputs(shape, dtype, seed=0, zero_decays=True):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape)
  a = rng.uniform(0.6, 1.0, size=shape)
  if zero_decays:
    # a = 0 is how the RG-LRU resets its state at document boundaries.
    a[rng.random(shape) < 0.05] = 0.0
  h0 = rng.normal(size=(shape[0], shape[2]))
  dy = rng.normal(size=shape)
  dh_last = rng.normal(size=(shape[0], shape[2]))
  # Quantise to the test dtype first, so the float64 reference sees exactly the kernel's inputs.
  x, a = (np.asarray(jnp.asarray(v, dtype).astype(jnp.float32), np.float64) for v in (x, a))
  return x, a, h0, dy, dh_last


def _scan_fn(impl):
  if impl == "pallas_tpu":
    return functools.partial(tpu.linear_scan, block_sizes=SMALL_TPU_BLOCKS, interpret=True)
  if impl == "pallas_gpu":
    # chunk=16: T=37/45 run as 3 time chunks (the last partial), covering the chunked passes;
    # prefetch covers the register double buffer (the default blocks' loop runs in
    # test_scan_sequence_parallel); T=1 and C=1 take the unmasked time and channel paths.
    blocks = gpu.BlockSizes(channels=128, chunk=16, unroll=4, prefetch=True)
    return functools.partial(gpu.linear_scan, block_sizes=blocks, interpret=True)
  return functools.partial(pallas_kernels.linear_scan, impl=impl)


def _assert_close(actual, expected, tol, what):
  actual = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
  scale = max(np.abs(expected).max(), 1e-30)
  err = np.abs(actual - expected).max() / scale
  assert err <= tol, f"{what}: max error {err:.3g} relative to max |ref| {scale:.3g} exceeds {tol}"


CASES = [
    # (batch, time, channels, reverse, with_h0, dtype)
    (3, 37, 200, False, True, jnp.float32),  # odd T and C; partial blocks on every axis
    (3, 37, 200, True, False, jnp.float32),
    (2, 1, 130, True, True, jnp.float32),  # T = 1
    (3, 45, 160, True, True, jnp.bfloat16),
]


# "auto" is xla_linear on CPU (test_auto_uses_xla_linear_on_cpu) and is covered by the tests below.
@pytest.mark.parametrize("impl", IMPLS[:-1])
@pytest.mark.parametrize("batch,time,channels,reverse,with_h0,dtype", CASES)
def test_values_and_grads_match_float64_reference(impl, batch, time, channels, reverse, with_h0, dtype):
  x, a, h0, dy, dh_last = _inputs((batch, time, channels), dtype)
  h0 = h0 if with_h0 else None
  scan = _scan_fn(impl)

  def loss(x, a, h0):
    y, h_last = scan(x, a, h0, reverse=reverse)
    return jnp.sum(y.astype(jnp.float32) * dy) + jnp.sum(h_last * dh_last), (y, h_last)

  args = (jnp.asarray(x, dtype), jnp.asarray(a, dtype),
          None if h0 is None else jnp.asarray(h0, jnp.float32))
  argnums = (0, 1) if h0 is None else (0, 1, 2)
  grads, (y, h_last) = jax.jit(jax.grad(loss, argnums, has_aux=True))(*args)

  assert y.dtype == dtype and y.shape == x.shape
  assert h_last.dtype == jnp.float32 and h_last.shape == (batch, channels)
  tol = TOLERANCE[dtype]
  y_ref, h_ref = reference.numpy_linear_scan(x, a, h0, reverse=reverse)
  _assert_close(y, y_ref, tol, "y")
  _assert_close(h_last, h_ref, tol, "h_last")
  grads_ref = reference.numpy_linear_scan_vjp(x, a, h0, dy, dh_last, reverse=reverse)
  for name, g, g_ref in zip(("dx", "da", "dh0"), grads, grads_ref):
    _assert_close(g, g_ref, tol, name)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed(impl):
  # h = 2 -> 0.5*2 + 1 = 2 -> 0.5*2 + 2 = 3 -> 0.5*3 + 3 = 4.5.
  # Reversed: h = 2 -> 0.5*2 + 3 = 4 -> 0.5*4 + 2 = 4 -> 0.5*4 + 1 = 3.
  x = jnp.asarray([1.0, 2.0, 3.0]).reshape(1, 3, 1)
  a = jnp.asarray([0.5, 0.5, 0.5]).reshape(1, 3, 1)
  h0 = jnp.asarray([[2.0]])
  y, h_last = _scan_fn(impl)(x, a, h0)
  np.testing.assert_allclose(np.asarray(y).ravel(), [2.0, 3.0, 4.5])
  np.testing.assert_allclose(np.asarray(h_last).ravel(), [4.5])
  y, h_last = _scan_fn(impl)(x, a, h0, reverse=True)
  np.testing.assert_allclose(np.asarray(y).ravel(), [3.0, 4.0, 4.0])
  np.testing.assert_allclose(np.asarray(h_last).ravel(), [3.0])


@pytest.mark.parametrize("blocks,dtype,reverse", [
    (tpu.BlockSizes(), jnp.float32, False),  # defaults: one block per axis at these sizes
    # T = 50 pads to 64 rows of bf16 (16-row tiles): time blocks of 48 + a partial 16, reversed.
    (tpu.BlockSizes(batch=1, time=48, channel_tiles=2), jnp.bfloat16, True),
])
def test_tpu_kernel_block_configurations(blocks, dtype, reverse):
  x, a, h0, dy, dh_last = _inputs((2, 50, 300), dtype, seed=1)
  f = functools.partial(tpu.linear_scan, reverse=reverse, block_sizes=blocks, interpret=True)

  def loss(x, a, h0):
    y, h_last = f(x, a, h0)
    return jnp.sum(y.astype(jnp.float32) * dy) + jnp.sum(h_last * dh_last), (y, h_last)

  grads, (y, h_last) = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(
      jnp.asarray(x, dtype), jnp.asarray(a, dtype), jnp.asarray(h0, jnp.float32))
  tol = TOLERANCE[dtype]
  y_ref, h_ref = reference.numpy_linear_scan(x, a, h0, reverse=reverse)
  _assert_close(y, y_ref, tol, "y")
  _assert_close(h_last, h_ref, tol, "h_last")
  grads_ref = reference.numpy_linear_scan_vjp(x, a, h0, dy, dh_last, reverse=reverse)
  for name, g, g_ref in zip(("dx", "da", "dh0"), grads, grads_ref):
    _assert_close(g, g_ref, tol, name)


def test_auto_uses_xla_linear_on_cpu():
  x, a, *_ = _inputs((2, 20, 64), jnp.float32, seed=2)
  jaxpr = str(jax.make_jaxpr(lambda x, a: pallas_kernels.linear_scan(x, a))(x, a))
  # platform_dependent keeps every branch in the jaxpr; the CPU lowering must run a while loop
  # (lax.scan) and no Pallas call.
  assert "platform_index" in jaxpr
  hlo = jax.jit(lambda x, a: pallas_kernels.linear_scan(x, a)).lower(x, a).as_text()
  assert "while" in hlo and "tpu_custom_call" not in hlo and "triton" not in hlo


def test_auto_lowers_to_triton_for_cuda():
  x = jax.ShapeDtypeStruct((2, 20, 64), jnp.bfloat16)
  fn = jax.jit(jax.grad(lambda x, a: pallas_kernels.linear_scan(x, a)[0].astype(jnp.float32).sum(),
                        (0, 1)))
  hlo = fn.trace(x, x).lower(lowering_platforms=("cuda",)).as_text()
  # Forward and backward kernels, both Triton.
  assert hlo.count("__gpu$xla.gpu.triton") == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(impl="pallas"), "impl='pallas' is not one of"),
    (dict(a=np.ones((2, 5, 3), np.float32)), r"x and a must be \[batch, time, channels\]"),
    (dict(h0=np.ones((2, 4), np.float32)), r"h0 must be \[batch, channels\]=\(2, 3\)"),
    (dict(x=np.ones((2, 4, 3), np.int32), a=np.ones((2, 4, 3), np.int32)), "floating dtype"),
    (dict(x=np.ones((2, 0, 3), np.float32), a=np.ones((2, 0, 3), np.float32)), "non-empty"),
])
def test_bad_arguments_are_named(kwargs, match):
  args = dict(x=np.ones((2, 4, 3), np.float32), a=np.ones((2, 4, 3), np.float32), h0=None)
  args.update(kwargs)
  impl = args.pop("impl", "auto")
  with pytest.raises(ValueError, match=match):
    pallas_kernels.linear_scan(args["x"], args["a"], args["h0"], impl=impl)


def test_kernel_argument_checks():
  with pytest.raises(ValueError, match="BlockSizes.time=24 must be a multiple of 16"):
    tpu.BlockSizes(time=24)
  with pytest.raises(ValueError, match="BlockSizes.batch=0"):
    tpu.BlockSizes(batch=0)
  with pytest.raises(ValueError, match="BlockSizes.channels=96 must be a power of two"):
    gpu.BlockSizes(channels=96)
  x = jnp.ones((1, 4, 8), jnp.float16)
  with pytest.raises(ValueError, match="pallas_tpu supports float32 and bfloat16; got x.dtype=float16"):
    tpu.linear_scan(x, x, interpret=True)
