"""The public `linear_scan` dispatcher (the design's stable API)."""

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import gpu
from pallas_kernels import reference
from pallas_kernels import tpu

IMPLS = ("auto", "xla_linear", "xla_associative", "pallas_tpu", "pallas_gpu")

# On CPU the sequential lax.scan beat lax.associative_scan at every training-like shape measured
# (benchmarks/scan.py; docs/kernels.md), forward and backward, float32 and bfloat16.
CPU_IMPL = "xla_linear"


def _impl_fn(impl: str, interpret: bool):
  if impl == "xla_linear":
    return reference.xla_linear_scan
  if impl == "xla_associative":
    return reference.xla_associative_scan
  if impl == "pallas_tpu":
    return functools.partial(tpu.run, block_sizes=tpu.BlockSizes(), interpret=interpret)
  if impl == "pallas_gpu":
    return functools.partial(gpu.run, block_sizes=gpu.BlockSizes(), interpret=interpret)
  raise ValueError(f"impl={impl!r} is not one of {IMPLS}")


_BACKEND_DTYPES = {"pallas_tpu": tpu.SUPPORTED_DTYPES, "pallas_gpu": gpu.SUPPORTED_DTYPES}


def validate(x: jax.Array, a: jax.Array, h0: Optional[jax.Array], impl: str) -> None:
  """Raises ValueError naming the bad argument; every entry point runs it once per call."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
  _common.check_operands(x, a, h0)
  if impl in _BACKEND_DTYPES:
    _common.check_dtypes(impl, _BACKEND_DTYPES[impl], x, a)


# The name scope of every scan op: profiles attribute time to the scan by it (the XLA fallback's
# ops would otherwise be anonymous while loops and fusions).
SCOPE = "linear_scan"


def dispatch(x: jax.Array, a: jax.Array, h0: Optional[jax.Array], *, reverse: bool, impl: str,
             interpret: bool) -> tuple[jax.Array, jax.Array]:
  """`linear_scan` without its argument checks (for callers that ran `validate`)."""
  with jax.named_scope(SCOPE):
    return _dispatch(x, a, h0, reverse=reverse, impl=impl, interpret=interpret)


def _dispatch(x: jax.Array, a: jax.Array, h0: Optional[jax.Array], *, reverse: bool, impl: str,
              interpret: bool) -> tuple[jax.Array, jax.Array]:
  if impl != "auto":
    return _impl_fn(impl, interpret)(x, a, h0, reverse=reverse)
  if interpret:
    return _impl_fn("pallas_tpu", True)(x, a, h0, reverse=reverse)
  if h0 is None:
    # platform_dependent branches must agree on their operands.
    h0 = jnp.zeros((x.shape[0], x.shape[2]), jnp.float32)

  def branch(name):
    if name in _BACKEND_DTYPES and not _common.supports(_BACKEND_DTYPES[name], x, a):
      # e.g. float16 on TPU: the kernel takes f32/bf16; the XLA scan computes the same values.
      name = "xla_linear"
    fn = _impl_fn(name, False)
    return lambda x, a, h0: fn(x, a, h0, reverse=reverse)

  return _common.platform_dependent(
      x, a, h0,
      tpu=branch("pallas_tpu"),
      cuda=branch("pallas_gpu"),
      rocm=branch("pallas_gpu"),
      default=branch(CPU_IMPL),
  )


def linear_scan(
    x: jax.Array,
    a: jax.Array,
    h0: Optional[jax.Array] = None,
    *,
    reverse: bool = False,
    impl: str = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Computes h_t = a_t * h_{t-1} + x_t over axis 1, accumulating in float32.

  Args:
    x: inputs, [batch, time, channels].
    a: decay factors, same shape as x.
    h0: optional initial state, [batch, channels]; zeros when None.
    reverse: scan from the last time step to the first.
    impl: one of IMPLS. "auto" picks per platform when the program is lowered (so an
      ahead-of-time compile for TPU gets the TPU kernel even on a CPU host): pallas_tpu on TPU,
      pallas_gpu on CUDA/ROCm, CPU_IMPL elsewhere.
    interpret: run the Pallas kernels in the Pallas interpreter (for CPU tests); with "auto",
      every platform then uses the kernel chosen for TPU so the test exercises it.

  Returns:
    (y, h_last): y has x's shape and dtype; h_last is float32 [batch, channels].
  """
  validate(x, a, h0, impl)
  return dispatch(x, a, h0, reverse=reverse, impl=impl, interpret=interpret)
