"""What the scan backends share: argument checks, the initial state, output types, the VJP binding.

The kernel modules (`tpu`, `gpu`) keep only kernels, grids and block sizes; each builds its
differentiable scan with `make_scan(fwd_call, bwd_call)`. Checks run once per public call: the
dispatcher (`scan.linear_scan`, `sequence_parallel_linear_scan`) validates and then calls the
backends' unchecked `run`.
"""

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

ACC_DTYPE = jnp.float32  # the scan state and every accumulation, whatever the input dtype


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
