"""Sequence-parallel linear scan: inputs sharded along time over a mesh axis (shard_map).

With n shards in scan order, shard k sees only its slice of time. The recurrence is affine in its
carry, so over one shard it is h_out = A_k * h_in + H_k with A_k the product of the shard's decays
and H_k the shard's scan from a zero state. Each shard computes (A_k, H_k) locally, all-gathers the n
pairs (2 * B * C floats each, tiny), folds them in scan order to get its exact incoming carry, and
rescans its slice from that carry. Nothing is approximated, so results equal the single-device scan
up to float32 rounding order.

Cost: two local scans (the first only for H_k) instead of one scan plus a cumulative product and a
correction pass (y + cumprod(a) * h_in), which would move more bytes: 6 array passes instead of 8.
The same function wraps the scan for any sharded operands (batch and channel axes too), which is
also what keeps the Pallas TPU kernel on per-device shapes (the original design).
"""

import dataclasses
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from pallas_kernels import scan

AxisNames = Union[None, str, Sequence[str]]


def _as_spec_entry(axes: AxisNames):
  if axes is None or isinstance(axes, str):
    return axes
  return tuple(axes)


def _mesh_axes(axes: AxisNames) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


@dataclasses.dataclass(frozen=True)
class ScanPlacement:
  """Where sharded [batch, time, channels] scan operands live: a mesh and each dimension's mesh axes.

  A static, hashable value (a module attribute of the model; sharding/ builds it from the rules) that
  `scan` turns into a `sequence_parallel_linear_scan` call.

  Attributes:
    mesh: the device mesh, concrete or abstract (an abstract one needs the concrete mesh installed,
      e.g. with `jax.set_mesh`, when the scan is traced).
    batch_axes, time_axes, channel_axes: mesh axes sharding each dimension (None: replicated).
  """

  mesh: Union[Mesh, AbstractMesh]
  batch_axes: AxisNames = None
  time_axes: AxisNames = None
  channel_axes: AxisNames = None

  def scan(self, x: jax.Array, a: jax.Array, h0: Optional[jax.Array] = None, *,
           reverse: bool = False, impl: str = "auto") -> tuple[jax.Array, jax.Array]:
    """`sequence_parallel_linear_scan` with this placement."""
    return sequence_parallel_linear_scan(
        x, a, h0, mesh=self.mesh, axis_name=self.time_axes, reverse=reverse, impl=impl,
        batch_axes=self.batch_axes, channel_axes=self.channel_axes)


def sequence_parallel_linear_scan(
    x: jax.Array,
    a: jax.Array,
    h0: Optional[jax.Array] = None,
    *,
    mesh: Union[Mesh, AbstractMesh],
    axis_name: AxisNames,
    reverse: bool = False,
    impl: str = "auto",
    interpret: bool = False,
    batch_axes: AxisNames = None,
    channel_axes: AxisNames = None,
) -> tuple[jax.Array, jax.Array]:
  """linear_scan over [batch, time, channels] arrays whose time axis is sharded over `axis_name`.

  Args:
    x: inputs, [batch, time, channels] (global shape), laid out as P(batch_axes, axis_name,
      channel_axes) over `mesh` (other layouts are resharded to that on entry).
    a: decay factors, same shape as x.
    h0: optional initial state, [batch, channels]; zeros when None.
    mesh: the device mesh, concrete or abstract (e.g. `jax.sharding.get_abstract_mesh()` while
      tracing under a mesh).
    axis_name: mesh axis (or axes) that shard time, or None when time is not sharded (then, as with
      an axis of size 1, there is no communication: this is the shard_map wrapper a Pallas TPU
      kernel needs for batch- or channel-sharded operands).
    reverse: scan from the last time step to the first.
    impl: per-shard implementation, as for linear_scan.
    interpret: run Pallas kernels in the interpreter.
    batch_axes: mesh axes sharding the batch axis, if any.
    channel_axes: mesh axes sharding the channel axis, if any.

  Returns:
    (y, h_last) as for linear_scan; y sharded like x, h_last as P(batch_axes, channel_axes).
  """
  scan.validate(x, a, h0, impl)
  for axis in _mesh_axes(axis_name):
    if axis not in mesh.shape:
      raise ValueError(f"axis_name={axis_name!r}: {axis!r} is not an axis of the mesh "
                       f"{dict(mesh.shape)}")
  used = [*_mesh_axes(axis_name), *_mesh_axes(batch_axes), *_mesh_axes(channel_axes)]
  for axis in used:
    if axis not in mesh.shape:
      raise ValueError(f"mesh axis {axis!r} is not in the mesh {dict(mesh.shape)}")
  if len(set(used)) != len(used):
    raise ValueError(f"a mesh axis may shard only one dimension; got {axis_name=} {batch_axes=} "
                     f"{channel_axes=}")
  num_shards = 1
  for axis in _mesh_axes(axis_name):
    num_shards *= mesh.shape[axis]
  axis_name = _as_spec_entry(axis_name)
  for dim, axes in ((0, batch_axes), (1, axis_name), (2, channel_axes)):
    size = 1
    for axis in _mesh_axes(axes):
      size *= mesh.shape[axis]
    if x.shape[dim] % size:
      raise ValueError(f"x.shape[{dim}]={x.shape[dim]} must be divisible by the {size} shards of "
                       f"mesh axes {axes!r}; got {x.shape=}")
  if h0 is None:
    h0 = jnp.zeros((x.shape[0], x.shape[2]), jnp.float32)

  seq_spec = P(_as_spec_entry(batch_axes), axis_name, _as_spec_entry(channel_axes))
  state_spec = P(_as_spec_entry(batch_axes), _as_spec_entry(channel_axes))

  def local(x, a, h0):
    if num_shards == 1:
      y, h_last = scan.dispatch(x, a, h0, reverse=reverse, impl=impl, interpret=interpret)
      return y, h_last[None]
    # (A_k, H_k): this shard's map h_out = A_k * h_in + H_k.
    _, shard_h = scan.dispatch(x, a, None, reverse=reverse, impl=impl, interpret=interpret)
    shard_a = jnp.prod(a.astype(jnp.float32), axis=1)
    all_h = jax.lax.all_gather(shard_h, axis_name)  # [n, b, c]
    all_a = jax.lax.all_gather(shard_a, axis_name)
    index = jax.lax.axis_index(axis_name)
    carry = h0.astype(jnp.float32)
    h_in = jnp.zeros_like(carry)
    for k in (reversed(range(num_shards)) if reverse else range(num_shards)):
      h_in = jnp.where(index == k, carry, h_in)
      carry = all_a[k] * carry + all_h[k]
    y, _ = scan.dispatch(x, a, h_in, reverse=reverse, impl=impl, interpret=interpret)
    # carry is now the global h_last, computed identically on every shard; see below.
    return y, carry[None]

  # Each shard returns its own copy of h_last and only one copy is used, so exactly one shard
  # receives h_last's cotangent. Returning it as replicated instead would hand the full cotangent to
  # every shard and, without varying-axes checks, the all_gather transpose would sum it n times.
  # check_vma=False because the Pallas interpreter (interpret=True) fails those checks.
  y, h_last = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(seq_spec, seq_spec, state_spec),
      out_specs=(seq_spec, P(axis_name, *state_spec)),
      check_vma=False,
  )(x, a, h0)
  return y, h_last[-1]
