"""Reference linear scans h_t = a_t * h_{t-1} + x_t over axis 1 of [B, T, C] arrays.

`xla_linear_scan` and `xla_associative_scan` are implementations in their own right (float32
accumulation, outputs in x's dtype; the CPU path of `linear_scan`); `numpy_linear_scan` and
`numpy_linear_scan_vjp` are the float64 ground truth every implementation is tested against.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common


def _prepare(x, a, h0, reverse):
  x32 = x.astype(jnp.float32)
  a32 = a.astype(jnp.float32)
  if reverse:
    x32, a32 = jnp.flip(x32, 1), jnp.flip(a32, 1)
  return x32, a32, _common.initial_state(x32, h0)


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


def numpy_linear_scan(x, a, h0=None, *, reverse=False):
  """float64 NumPy loop: the ground truth the tests hold every implementation to.

  Returns (y [B, T, C], h_last [B, C]), both float64.
  """
  x = np.asarray(x, np.float64)
  a = np.asarray(a, np.float64)
  h = np.zeros((x.shape[0], x.shape[2])) if h0 is None else np.asarray(h0, np.float64)
  y = np.empty_like(x)
  for t in (range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])):
    h = a[:, t] * h + x[:, t]
    y[:, t] = h
  return y, h


def numpy_linear_scan_vjp(x, a, h0, dy, dh_last, *, reverse=False):
  """float64 cotangents (dx, da, dh0) of numpy_linear_scan for output cotangents (dy, dh_last).

  With g_t = dL/dh_t in scan order: g_t = dy_t + a_{t+1} g_{t+1} (g after the last step is
  dh_last), dx_t = g_t, da_t = g_t * h_{t-1} (h0 before the first step), dh0 = a_first * g_first.
  """
  a = np.asarray(a, np.float64)
  dy = np.asarray(dy, np.float64)
  h0 = np.zeros((a.shape[0], a.shape[2])) if h0 is None else np.asarray(h0, np.float64)
  y, _ = numpy_linear_scan(x, a, h0, reverse=reverse)
  order = list(range(a.shape[1] - 1, -1, -1)) if reverse else list(range(a.shape[1]))
  dx = np.empty_like(dy)
  da = np.empty_like(dy)
  m = np.asarray(dh_last, np.float64)  # a_{t+1} g_{t+1}, flowing into h_t from later steps
  for i in reversed(range(len(order))):
    t = order[i]
    g = dy[:, t] + m
    dx[:, t] = g
    da[:, t] = g * (y[:, order[i - 1]] if i > 0 else h0)
    m = a[:, t] * g
  return dx, da, m
