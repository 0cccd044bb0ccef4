"""Pure-XLA linear scans: the references every kernel is checked against.

Both compute h_t = a_t * h_{t-1} + x_t over axis 1 of [B, T, C] arrays,
accumulating in float32 and returning outputs in the dtype of x.
"""

import jax
import jax.numpy as jnp


def _prepare(x, a, h0, reverse):
  x32 = x.astype(jnp.float32)
  a32 = a.astype(jnp.float32)
  if reverse:
    x32, a32 = jnp.flip(x32, 1), jnp.flip(a32, 1)
  # Deriving the state from x32 gives it x's varying manual axes under shard_map, which lax.scan
  # requires of a carry (an h0 replicated over a sequence axis would otherwise mismatch).
  h = jnp.zeros_like(x32[:, 0])
  if h0 is not None:
    h = h + h0.astype(jnp.float32)
  return x32, a32, h


def _finish(y32, h_last, x_dtype, reverse):
  if reverse:
    y32 = jnp.flip(y32, 1)
  return y32.astype(x_dtype), h_last


def xla_linear_scan(x, a, h0=None, *, reverse=False):
  """Sequential scan with lax.scan; returns (y [B, T, C], h_last [B, C] f32)."""
  x32, a32, h = _prepare(x, a, h0, reverse)

  def step(h_BC, xa):
    x_BC, a_BC = xa
    h_BC = a_BC * h_BC + x_BC
    return h_BC, h_BC

  h_last, y_TBC = jax.lax.scan(step, h, (x32.swapaxes(0, 1), a32.swapaxes(0, 1)))
  return _finish(y_TBC.swapaxes(0, 1), h_last, x.dtype, reverse)


def xla_associative_scan(x, a, h0=None, *, reverse=False):
  """Parallel-prefix scan with lax.associative_scan; same contract."""
  x32, a32, h = _prepare(x, a, h0, reverse)
  # Fold h0 into the first input so the scan itself starts from zero.
  x32 = x32.at[:, 0].add(a32[:, 0] * h)

  def combine(left, right):
    a_l, x_l = left
    a_r, x_r = right
    return a_l * a_r, a_r * x_l + x_r

  _, y32 = jax.lax.associative_scan(combine, (a32, x32), axis=1)
  return _finish(y32, y32[:, -1], x.dtype, reverse)
