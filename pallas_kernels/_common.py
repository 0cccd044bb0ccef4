"""What the scan backends share: argument checks, the initial state, output types, the VJP binding.

The kernel modules (`tpu`, `gpu`) keep only kernels, grids and block sizes; each builds its
differentiable scan with `make_scan(fwd_call, bwd_call)`. Checks run once per public call: the
dispatcher (`scan.linear_scan`, `sequence_parallel_linear_scan`) validates and then calls the
backends' unchecked `run`.
"""

import contextlib
import contextvars
import functools
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp

ACC_DTYPE = jnp.float32  # the scan state and every accumulation, whatever the input dtype

# The platform a step function is being traced for, when its mesh says (`tracing_for`).
_TRACE_PLATFORM: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "trace_platform", default=None)


@contextlib.contextmanager
def tracing_for(platform: Optional[str]) -> Iterator[None]:
  """Within it, `platform_dependent` traces only `platform`'s branch ("cpu" or "tpu"; None or any
  other platform: every branch, as jax.lax.platform_dependent does)."""
  token = _TRACE_PLATFORM.set(platform if platform in ("cpu", "tpu") else None)
  try:
    yield
  finally:
    _TRACE_PLATFORM.reset(token)


def platform_dependent(*args, default: Callable, **per_platform: Callable):
  """jax.lax.platform_dependent, less the tracing of branches that cannot be lowered.

  jax traces every branch and keeps the lowered platform's at lowering. A train step traced that way
  traced the model's forward and backward once per branch of each call (the fused CPU loss and the
  plain one, the CPU and TPU/GPU scans): half of a small run's trace time (py-spy). Where the
  platform is known at trace time (`tracing_for`), only its branch is traced; the program is the
  one lowering would have kept.
  """
  platform = _TRACE_PLATFORM.get()
  if platform is not None:
    return per_platform.get(platform, default)(*args)
  return jax.lax.platform_dependent(*args, default=default, **per_platform)


def check_operands(x: jax.Array, a: jax.Array, h0: Optional[jax.Array]) -> None:
  """Raises ValueError naming the bad argument: shapes, a non-empty time axis, float dtypes."""
  if x.ndim != 3 or x.shape != a.shape:
    raise ValueError(f"x and a must be [batch, time, channels] of one shape; got {x.shape=} {a.shape=}")
  if x.shape[1] == 0:
    raise ValueError(f"the time axis must be non-empty; got {x.shape=}")
  for name, v in (("x", x), ("a", a)):
    if not jnp.issubdtype(v.dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating dtype; got {name}.dtype={v.dtype}")
  if h0 is not None and h0.shape != (x.shape[0], x.shape[2]):
    raise ValueError(f"h0 must be [batch, channels]={(x.shape[0], x.shape[2])}; got {h0.shape=}")


def _dtype_names(dtypes: Sequence[jnp.dtype]) -> str:
  names = [jnp.dtype(d).name for d in dtypes]
  return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def supports(dtypes: Sequence[jnp.dtype], x: jax.Array, a: jax.Array) -> bool:
  return x.dtype in dtypes and a.dtype in dtypes


def check_dtypes(backend: str, dtypes: Sequence[jnp.dtype], x: jax.Array, a: jax.Array) -> None:
  """Raises ValueError if a kernel backend does not take x's or a's dtype."""
  for name, v in (("x", x), ("a", a)):
    if v.dtype not in dtypes:
      raise ValueError(f"{backend} supports {_dtype_names(dtypes)}; got {name}.dtype={v.dtype}")


def initial_state(x: jax.Array, h0: Optional[jax.Array]) -> jax.Array:
  """h0 (zeros when None) as float32 [batch, channels], derived from x.

  Deriving it from x gives it x's varying manual axes under shard_map, which a lax.scan carry and a
  kernel's output types require (an h0 replicated over a sequence axis would otherwise mismatch).
  """
  zeros = jnp.zeros_like(x[:, 0], ACC_DTYPE)
  return zeros if h0 is None else zeros + h0.astype(ACC_DTYPE)


def out_struct(shape: Sequence[int], dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
  """An output type that varies over the same shard_map mesh axes as `like` (check_vma)."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).mat)


def make_scan(fwd_call: Callable, bwd_call: Callable) -> Callable:
  """The differentiable scan `f(x, a, h0, reverse, blocks, interpret) -> (y, h_last)` of a backend.

  Args:
    fwd_call: `(x, a, h0, *, reverse, blocks, interpret) -> (y, h_last)`, the forward kernel.
    bwd_call: `(dy, a, y, h0, dh_last, *, reverse, blocks, interpret) -> (dx, da, dh0)`, the
      adjoint kernel; h_{t-1} is read back from the saved output y.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
  def _scan(x, a, h0, reverse, blocks, interpret):
    return fwd_call(x, a, h0, reverse=reverse, blocks=blocks, interpret=interpret)

  def _scan_fwd(x, a, h0, reverse, blocks, interpret):
    y, h_last = fwd_call(x, a, h0, reverse=reverse, blocks=blocks, interpret=interpret)
    return (y, h_last), (a, y, h0)

  def _scan_bwd(reverse, blocks, interpret, residuals, cotangents):
    a, y, h0 = residuals
    dy, dh_last = cotangents
    dx, da, dh0 = bwd_call(dy.astype(y.dtype), a, y, h0, dh_last.astype(ACC_DTYPE),
                           reverse=reverse, blocks=blocks, interpret=interpret)
    return dx, da, dh0

  _scan.defvjp(_scan_fwd, _scan_bwd)
  return _scan
