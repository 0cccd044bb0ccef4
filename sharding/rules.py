"""Logical-axis rule tables, one per partitioning strategy, and the helpers that apply them.

A rule table is a tuple of `(logical_axis, mesh_axes)` pairs in priority order, in the format
`flax.linen.logical_axis_rules` takes: for each array, rules are tried in order and a rule applies
when its logical axis is one of the array's dimensions that is still unassigned and none of its mesh
axes is already used by another dimension of that array. This priority is what lets one name serve
both parameters and activations: `batch` comes first, so an activation `[batch, length, embed]` puts
`fsdp` on the batch and leaves `embed` replicated, while a parameter `[embed, mlp]` (no batch) puts
`fsdp` on `embed` (ZeRO-3).

The Griffin strategy ([G] section 4 "Model parallelism"):
  - MLP: up/gate projections `[embed, mlp]` column-sharded on `model`, down `[mlp, embed]` row-sharded:
    one all-reduce forward and one backward (Megatron).
  - Attention: query heads on `model`; the single MQA key/value head (`kv`) is replicated, so every
    `model` shard keeps the whole K/V and MQA stays MQA. The output projection is row-sharded.
  - Recurrent block: both input projections `[embed, rnn]` column-sharded, Conv1D `[conv, rnn]` and the
    RG-LRU (`rnn` channels; gate weights `[rnn_block, ...]`) sharded by channel with the gate blocks
    on `model`, so a `model` shard owns whole gate blocks and exactly the channels they produce: the
    Conv1D, gates and recurrence need no communication. The output projection `[rnn, embed]` is
    row-sharded.
  - ZeRO-3 on `fsdp` through `embed`, the one dimension every large weight has.
  - Batch on `slice x data x fsdp`, time on `seq`.
"""

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sharding.mesh import MESH_AXES

LOGICAL_AXES = ("batch", "length", "embed", "vocab", "mlp", "heads", "kv", "head_dim", "rnn",
                "rnn_block", "conv", "layers")

MeshAxes = Union[None, str, tuple[str, ...]]
Rules = tuple[tuple[str, MeshAxes], ...]

_BATCH = ("slice", "data", "fsdp")

STRATEGIES: dict[str, Rules] = {
    # The paper's scheme: Megatron TP on `model`, ZeRO-3 on `fsdp`, sequence parallelism on `seq`.
    "griffin": (
        ("batch", _BATCH),
        ("length", "seq"),
        ("vocab", "model"),
        ("mlp", "model"),
        ("heads", "model"),
        ("rnn", "model"),
        ("rnn_block", "model"),
        ("embed", "fsdp"),
        ("kv", None),
        ("head_dim", None),
        ("conv", None),
        ("layers", None),
    ),
    # ZeRO-3 only: no tensor parallelism, so `model` must have size 1.
    "fsdp": (
        ("batch", _BATCH),
        ("length", "seq"),
        ("embed", "fsdp"),
        ("vocab", None),
        ("mlp", None),
        ("heads", None),
        ("kv", None),
        ("head_dim", None),
        ("rnn", None),
        ("rnn_block", None),
        ("conv", None),
        ("layers", None),
    ),
    # Plain data parallelism: every parameter replicated; `fsdp` and `model` must have size 1.
    "dp": (
        ("batch", _BATCH),
        ("length", "seq"),
    ) + tuple((a, None) for a in LOGICAL_AXES if a not in ("batch", "length")),
}

# Mesh axes a strategy may give a size above 1; the others would silently replicate work.
_STRATEGY_AXES = {
    "griffin": set(MESH_AXES),
    "fsdp": {"slice", "data", "fsdp", "seq"},
    "dp": {"slice", "data", "seq"},
}


def rules_for(strategy: str) -> Rules:
  """Returns the rule table of `strategy` (a key of `STRATEGIES`)."""
  if strategy not in STRATEGIES:
    raise ValueError(f"mesh.strategy={strategy!r} is not one of {sorted(STRATEGIES)}")
  return STRATEGIES[strategy]


def check_strategy_mesh(strategy: str, axis_sizes: dict[str, int]) -> None:
  """Raises if the mesh gives size > 1 to an axis the strategy never shards over."""
  rules_for(strategy)
  unused = {a: s for a, s in axis_sizes.items() if s > 1 and a not in _STRATEGY_AXES[strategy]}
  if unused:
    raise ValueError(
        f"mesh.strategy={strategy!r} does not shard over mesh axes {unused}; set them to 1 or use "
        f"strategy 'griffin'")


def logical_to_spec(logical_axes: Optional[Sequence[Optional[str]]], rules: Rules) -> PartitionSpec:
  """Maps one array's logical axis names to a PartitionSpec under `rules`."""
  if logical_axes is None:
    return PartitionSpec()
  unknown = [a for a in logical_axes if a is not None and a not in LOGICAL_AXES]
  if unknown:
    raise ValueError(f"logical axes {unknown} in {tuple(logical_axes)} are not in {LOGICAL_AXES}")
  return nn.logical_to_mesh_axes(tuple(logical_axes), rules)


def dim_mesh_axes(logical_axes: Sequence[Optional[str]], rules: Rules) -> tuple[MeshAxes, ...]:
  """One mesh-axes entry per dimension (None: replicated) of an array with these logical axes.

  For code that must place work by hand: the step builder turns the RG-LRU scan's entries into a
  `pallas_kernels.ScanPlacement` (a Pallas kernel inside `shard_map`, which the partitioner cannot
  split).
  """
  spec = logical_to_spec(logical_axes, rules)
  return tuple(spec) + (None,) * (len(logical_axes) - len(spec))


def is_axes_leaf(x: Any) -> bool:
  """True for a tree leaf of logical axes: None or a tuple of axis names (or None)."""
  return x is None or (type(x) is tuple and all(e is None or isinstance(e, str) for e in x))


def tree_specs(logical_tree: Any, rules: Rules) -> Any:
  """PartitionSpecs for a pytree whose leaves are logical-axis tuples."""
  return jax.tree.map(lambda a: logical_to_spec(a, rules), logical_tree, is_leaf=is_axes_leaf)


def spec_devices(spec_entry: MeshAxes, mesh: jax.sharding.Mesh) -> int:
  """Devices one PartitionSpec entry splits a dimension over."""
  if spec_entry is None:
    return 1
  names = (spec_entry,) if isinstance(spec_entry, str) else spec_entry
  return int(np.prod([mesh.shape[n] for n in names]))


def tree_shardings(
    logical_tree: Any,
    mesh: jax.sharding.Mesh,
    rules: Rules,
    shapes: Any = None,
) -> Any:
  """NamedShardings for a pytree of logical-axis tuples.

  Args:
    logical_tree: pytree whose leaves are tuples of logical axis names (or None).
    mesh: the device mesh.
    rules: a rule table from `STRATEGIES`.
    shapes: optional pytree of the same structure with arrays / ShapeDtypeStructs; when given, every
      sharded dimension is checked to divide evenly (uneven shards waste memory and, for the gate
      blocks, would split a block across devices and bring back communication).

  Raises:
    ValueError: listing every array whose dimension does not divide by its mesh axes.
  """
  specs = tree_specs(logical_tree, rules)
  if shapes is not None:
    problems = []
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    flat_shapes = jax.tree.leaves(shapes)
    if len(flat_specs) != len(flat_shapes):
      raise ValueError(
          f"logical axes tree has {len(flat_specs)} leaves but the shapes tree has {len(flat_shapes)}")
    for (path, spec), arr in zip(flat_specs, flat_shapes):
      if len(spec) > len(arr.shape):
        raise ValueError(f"{jax.tree_util.keystr(path)}: spec {spec} has more dims than shape {arr.shape}")
      for dim, entry in zip(arr.shape, spec):
        n = spec_devices(entry, mesh)
        if dim % n:
          problems.append(f"{jax.tree_util.keystr(path)} shape {tuple(arr.shape)} dim {dim} on {entry} "
                          f"({n} devices)")
    if problems:
      raise ValueError("these arrays do not divide evenly over the mesh (change the mesh or the model "
                       "sizes):\n  " + "\n  ".join(problems))
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def per_device_bytes(shape: Sequence[int], dtype: Any, spec: PartitionSpec, mesh: jax.sharding.Mesh) -> int:
  """Bytes one device holds of an array with `spec` (ceil-divided shards)."""
  n = 1
  for i, dim in enumerate(shape):
    parts = spec_devices(spec[i], mesh) if i < len(spec) else 1
    n *= -(-dim // parts)
  return n * np.dtype(dtype).itemsize


def sharding_report(abstract_tree: Any, logical_tree: Any, shardings: Any) -> tuple[list[dict[str, Any]], str]:
  """Lists every array with its logical axes, mesh sharding and per-device bytes.

  Returns:
    (rows, text): one dict per array (path, shape, dtype, logical, spec, device_bytes) and a
    printable table ending with the per-device total.
  """
  flat = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  logical = jax.tree.leaves(logical_tree, is_leaf=is_axes_leaf)
  sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  if not (len(flat) == len(logical) == len(sh)):
    raise ValueError(f"tree sizes differ: arrays {len(flat)}, logical axes {len(logical)}, "
                     f"shardings {len(sh)}")
  rows = []
  for (path, arr), axes, s in zip(flat, logical, sh):
    rows.append(dict(
        path=jax.tree_util.keystr(path), shape=tuple(arr.shape), dtype=str(np.dtype(arr.dtype)),
        logical=axes, spec=s.spec,
        device_bytes=per_device_bytes(arr.shape, arr.dtype, s.spec, s.mesh)))
  width = max([len(r["path"]) for r in rows] + [4])
  lines = [f"{'path':<{width}}  {'shape':<22} {'dtype':<9} {'logical':<34} {'sharding':<34} per-device"]
  for r in rows:
    lines.append(f"{r['path']:<{width}}  {str(r['shape']):<22} {r['dtype']:<9} {str(r['logical']):<34} "
                 f"{str(tuple(r['spec'])):<34} {_fmt_bytes(r['device_bytes'])}")
  total = sum(r["device_bytes"] for r in rows)
  lines.append(f"total per device: {_fmt_bytes(total)} in {len(rows)} arrays")
  return rows, "\n".join(lines)


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return f"{n:.1f} GiB"
