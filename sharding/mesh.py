"""Device meshes: `data`, `fsdp`, `seq`, `model` within a slice (ICI), `slice` across slices (DCN).

Every mesh built here has all five axes, in the order `MESH_AXES`, even when some have size 1, so the
rule tables in `sharding/rules.py` can always name them. `model` is the innermost (fastest varying)
axis because tensor parallelism communicates inside every layer and needs the shortest ICI hops;
`slice` is the outermost because DCN is an order of magnitude slower than ICI and carries only the
batch-parallel gradient reduction.
"""

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

# Axis order, outermost first. `slice` crosses DCN; the other four stay within a slice.
MESH_AXES = ("slice", "data", "fsdp", "seq", "model")
ICI_AXES = ("data", "fsdp", "seq", "model")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Requested mesh shape; one ICI axis may be -1 (filled from the device count).

  Attributes:
    strategy: name of a rule table in `sharding.rules.STRATEGIES`.
    data: pure data parallelism (parameters replicated).
    fsdp: ZeRO-3 (parameters, optimizer state and batch sharded).
    seq: sequence parallelism (activations sharded along time).
    model: Megatron-style tensor parallelism.
    num_slices: TPU slices joined over DCN (the `slice` axis).
  """

  strategy: str = "griffin"
  data: int = 1
  fsdp: int = -1
  seq: int = 1
  model: int = 1
  num_slices: int = 1

  def __post_init__(self):
    sizes = {a: getattr(self, a) for a in ICI_AXES}
    bad = {a: s for a, s in sizes.items() if s != -1 and s < 1}
    if bad:
      raise ValueError(f"mesh axis sizes must be >= 1 or -1 (auto); got {bad}")
    autos = [a for a, s in sizes.items() if s == -1]
    if len(autos) > 1:
      raise ValueError(f"at most one mesh axis may be -1 (auto-filled); got -1 for {autos}")
    if self.num_slices < 1:
      raise ValueError(f"mesh.num_slices must be >= 1; got {self.num_slices}")

  def resolve(self, num_devices: int) -> dict[str, int]:
    """Returns the size of every axis in `MESH_AXES` for `num_devices` devices in total.

    Raises:
      ValueError: the sizes cannot multiply to the device count, with the numbers involved.
    """
    if num_devices % self.num_slices:
      raise ValueError(
          f"{num_devices} devices cannot be split into mesh.num_slices={self.num_slices} equal slices")
    per_slice = num_devices // self.num_slices
    sizes = {a: getattr(self, a) for a in ICI_AXES}
    known = math.prod(s for s in sizes.values() if s != -1)
    autos = [a for a, s in sizes.items() if s == -1]
    if autos:
      if per_slice % known:
        raise ValueError(
            f"mesh {self.describe()} cannot fill -1 for '{autos[0]}': the other axes multiply to "
            f"{known}, which does not divide the {per_slice} devices per slice")
      sizes[autos[0]] = per_slice // known
    elif known != per_slice:
      raise ValueError(
          f"mesh {self.describe()} has {known} devices per slice but there are {per_slice} "
          f"({num_devices} devices / {self.num_slices} slices); make the product match or set one "
          f"axis to -1")
    return {"slice": self.num_slices, **sizes}

  def describe(self) -> str:
    return (f"data={self.data} fsdp={self.fsdp} seq={self.seq} model={self.model} "
            f"num_slices={self.num_slices}")


def _device_grid(ici_shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """Arranges one slice's devices so that inner mesh axes follow the physical ICI torus."""
  platform = devices[0].platform
  if platform == "tpu" and len(devices) > 1:
    try:
      return mesh_utils.create_device_mesh(ici_shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
      # Shapes that do not map onto whole physical axes (e.g. model=3 on a 4x4x4 torus) are still
      # valid meshes, only with longer ICI paths; allow split physical axes for them.
      return mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
  return np.asarray(devices, dtype=object).reshape(ici_shape)


def create_mesh(mesh_config: MeshConfig, devices: Optional[Sequence[Any]] = None) -> jax.sharding.Mesh:
  """Builds the 5-axis mesh (`MESH_AXES`) over `devices` (default: all of `jax.devices()`).

  With `num_slices > 1` the devices must carry `slice_index` (TPU multi-slice, or a topology from
  `jax.experimental.topologies.get_topology_desc(..., num_slices=N)`), and the `slice` axis is laid
  over DCN with a hybrid device mesh; every other axis stays inside a slice.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_config.resolve(len(devices))
  ici_shape = [sizes[a] for a in ICI_AXES]
  if mesh_config.num_slices == 1:
    grid = _device_grid(ici_shape, devices)[None]
  else:
    slice_ids = sorted({getattr(d, "slice_index", None) for d in devices}, key=str)
    if None in slice_ids or len(slice_ids) != mesh_config.num_slices:
      raise ValueError(
          f"mesh.num_slices={mesh_config.num_slices} but the devices come from slices {slice_ids}; "
          "multi-slice meshes need devices with a slice_index (a multi-slice TPU job or "
          "get_topology_desc(..., num_slices=N))")
    grid = mesh_utils.create_hybrid_device_mesh(
        [1] + ici_shape, [mesh_config.num_slices] + [1] * len(ici_shape), devices,
        allow_split_physical_axes=True)
  return jax.sharding.Mesh(grid.reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)

