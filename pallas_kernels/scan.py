"""The public `linear_scan` dispatcher (DESIGN.md's stable API)."""

from typing import Optional

import jax

from pallas_kernels import reference

IMPLS = ("auto", "xla_linear", "xla_associative", "pallas_tpu", "pallas_gpu")


def linear_scan(
    x: jax.Array,
    a: jax.Array,
    h0: Optional[jax.Array] = None,
    *,
    reverse: bool = False,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array]:
  """Computes h_t = a_t * h_{t-1} + x_t over axis 1, accumulating in float32.

  Args:
    x: inputs, [batch, time, channels].
    a: decay factors, same shape as x.
    h0: optional initial state, [batch, channels]; zeros when None.
    reverse: scan from the last time step to the first.
    impl: one of IMPLS.

  Returns:
    (y, h_last): y has x's shape and dtype; h_last is float32 [batch, channels].
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
  if x.ndim != 3 or x.shape != a.shape:
    raise ValueError(f"x and a must be [batch, time, channels] of one shape; got {x.shape=} {a.shape=}")
  if h0 is not None and h0.shape != (x.shape[0], x.shape[2]):
    raise ValueError(f"h0 must be [batch, channels]={(x.shape[0], x.shape[2])}; got {h0.shape=}")
  if impl in ("auto", "xla_linear"):
    return reference.xla_linear_scan(x, a, h0, reverse=reverse)
  if impl == "xla_associative":
    return reference.xla_associative_scan(x, a, h0, reverse=reverse)
  raise NotImplementedError(f"impl={impl!r} is not built yet")
