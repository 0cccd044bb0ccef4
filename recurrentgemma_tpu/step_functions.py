"""The jitted, sharded init / train / eval functions for one model, optimizer and mesh.

`build_step_functions` derives everything placement needs from the mesh and the strategy's rule
table: state and batch shardings, and the RG-LRU scan's `ScanPlacement`, which it passes to the
model explicitly. Docs: docs/sharding.md.
"""

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

import pallas_kernels
from recurrentgemma_tpu import model as model_lib
from recurrentgemma_tpu.optimizer import OptimizerConfig, make_optimizer
from recurrentgemma_tpu.train_step import (BATCH_AXES, BATCH_KEYS, Batch, Metrics, TrainState,
                                           compute_gradients, eval_step, init_state, train_step)
from sharding import rules as rules_lib


def scan_placement(mesh: jax.sharding.Mesh, rules: rules_lib.Rules) -> pallas_kernels.ScanPlacement:
  """Where the RG-LRU scan's operands live under `rules`: it runs per shard on `mesh` (a Pallas
  kernel cannot be auto-partitioned), exchanging carries when time is sharded."""
  batch, length, rnn = rules_lib.dim_mesh_axes(model_lib.SCAN_AXES, rules)
  return pallas_kernels.ScanPlacement(mesh, batch_axes=batch, time_axes=length, channel_axes=rnn)


def check_batch_shape(global_batch: int, seq_len: int, mesh: jax.sharding.Mesh, num_microbatches: int,
                      rules: rules_lib.Rules) -> None:
  """Raises before any compile if the batch cannot be split over micro-batches and the mesh.

  Run once per batch shape: by `experiment.build` for a run's batches, by `abstract_batch` for an
  ahead-of-time lowering; the jitted steps do not repeat it.
  """
  batch_axes, seq_axes = rules_lib.dim_mesh_axes(BATCH_AXES, rules)
  batch_shards = rules_lib.spec_devices(batch_axes, mesh)
  seq_shards = rules_lib.spec_devices(seq_axes, mesh)
  if global_batch % num_microbatches:
    raise ValueError(f"global batch {global_batch} does not divide into optimizer.num_microbatches="
                     f"{num_microbatches}")
  micro = global_batch // num_microbatches
  if micro % batch_shards:
    raise ValueError(f"micro-batch of {micro} sequences (global batch {global_batch} / "
                     f"{num_microbatches} micro-batches) does not divide over the {batch_shards} batch "
                     f"shards of mesh axes {batch_axes}; use a batch that is a multiple of "
                     f"{batch_shards * num_microbatches}")
  if seq_len % seq_shards:
    raise ValueError(f"sequence length {seq_len} does not divide over mesh axis seq={seq_shards}")


@dataclasses.dataclass(frozen=True)
class _Axes:
  """Logical axes wrapped as a pytree leaf (a bare tuple would be traversed)."""

  axes: tuple


class _InMeshContext:
  """A jitted function called (or lowered) with the mesh and logical-axis rules installed.

  The model's `nn.with_logical_constraint` annotations are resolved at trace time from these contexts,
  so every call site must install them; this wrapper makes that impossible to forget.
  """

  def __init__(self, jitted: Callable, mesh: jax.sharding.Mesh, rules: rules_lib.Rules):
    self._jitted, self._mesh, self._rules = jitted, mesh, rules

  @contextlib.contextmanager
  def _context(self):
    # The mesh's devices say which platform the step is lowered for: other platforms' branches are
    # not traced (pallas_kernels.platform_dependent).
    platform = self._mesh.devices.flat[0].platform
    with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules), \
        pallas_kernels.tracing_for(platform):
      yield

  def __call__(self, *args):
    with self._context():
      return self._jitted(*args)

  def lower(self, *args) -> jax.stages.Lowered:
    with self._context():
      return self._jitted.lower(*args)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
  """The jitted, sharded init / train / eval functions for one model, optimizer and mesh."""

  model_config: model_lib.ModelConfig
  opt_config: OptimizerConfig
  mesh: jax.sharding.Mesh
  strategy: str
  rules: rules_lib.Rules
  scan_placement: pallas_kernels.ScanPlacement
  tx: optax.GradientTransformation
  param_logical_axes: Any
  abstract_state: TrainState
  state_shardings: TrainState
  batch_shardings: dict[str, NamedSharding]
  init_fn: _InMeshContext
  train_fn: _InMeshContext
  eval_fn: _InMeshContext
  grad_fn: _InMeshContext

  def create_state(self, rng: jax.Array) -> TrainState:
    """Initial state, each array created directly in its shards (no full copy anywhere)."""
    return self.init_fn(rng)

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """Jitted `train_step`; `state` is donated (do not reuse it after the call)."""
    return self.train_fn(state, batch)

  def eval_step(self, params: Any, batch: Batch) -> Metrics:
    return self.eval_fn(params, batch)

  def gradients(self, params: Any, batch: Batch) -> tuple[Any, Metrics]:
    """Jitted `compute_gradients` with the training shardings (for inspection and tests)."""
    return self.grad_fn(params, batch)

  def state_logical_axes(self) -> TrainState:
    """Logical axes of every array in the state (optimizer moments follow their parameter)."""
    boxed = jax.tree.map(_Axes, self.param_logical_axes, is_leaf=rules_lib.is_axes_leaf)
    opt = optax.tree_map_params(self.tx, lambda _, a: a, self.abstract_state.opt_state, boxed,
                                transform_non_params=lambda x: _Axes(()) if hasattr(x, "shape") else x,
                                is_leaf=lambda x: isinstance(x, _Axes))
    unbox = lambda t: jax.tree.map(lambda a: a.axes, t, is_leaf=lambda x: isinstance(x, _Axes))
    return TrainState(step=(), params=self.param_logical_axes, opt_state=unbox(opt))

  def state_report(self) -> tuple[list[dict[str, Any]], str]:
    """Every state array with its logical axes, mesh sharding and per-device bytes."""
    return rules_lib.sharding_report(self.abstract_state, self.state_logical_axes(),
                                     self.state_shardings)

  def abstract_batch(self, global_batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape/dtype/sharding stand-ins for a global batch (for ahead-of-time lowering)."""
    check_batch_shape(global_batch, seq_len, self.mesh, self.opt_config.num_microbatches, self.rules)
    dtypes = {k: jnp.int32 for k in BATCH_KEYS} | {"loss_weights": jnp.float32}
    return {k: jax.ShapeDtypeStruct((global_batch, seq_len), dtypes[k], sharding=self.batch_shardings[k])
            for k in BATCH_KEYS}

  def lower_train_step(self, global_batch: int, seq_len: int) -> jax.stages.Lowered:
    """Lowers the train step from shapes alone (no arrays are allocated)."""
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         self.abstract_state, self.state_shardings)
    return self.train_fn.lower(state, self.abstract_batch(global_batch, seq_len))


def build_step_functions(model_config: model_lib.ModelConfig, opt_config: OptimizerConfig,
                         mesh: jax.sharding.Mesh, strategy: str) -> StepFunctions:
  """Shardings from `sharding/` and the jitted steps for this model, optimizer and mesh.

  The strategy against the mesh is checked once, by `experiment.build` (`check_strategy_mesh`).

  Raises:
    ValueError: an unknown strategy, or a parameter does not divide over its mesh axes (e.g. gate
      blocks not a multiple of `model`) — before anything is compiled.
  """
  rules = rules_lib.rules_for(strategy)
  placement = scan_placement(mesh, rules)
  logical = model_lib.param_logical_axes(model_config)
  tx = make_optimizer(opt_config, logical)
  init = functools.partial(init_state, model_config=model_config, tx=tx)
  abstract_state = jax.eval_shape(init, jax.random.key(0))

  param_shardings = rules_lib.tree_shardings(logical, mesh, rules, shapes=abstract_state.params)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_state.opt_state, param_shardings,
      transform_non_params=lambda x: replicated if hasattr(x, "shape") else x,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  state_shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
  batch_sharding = NamedSharding(mesh, rules_lib.logical_to_spec(BATCH_AXES, rules))
  batch_shardings = {k: batch_sharding for k in BATCH_KEYS}

  init_fn = jax.jit(init, out_shardings=state_shardings)
  step = functools.partial(train_step, model_config=model_config, opt_config=opt_config,
                           param_logical_axes=logical, scan_placement=placement)
  metric_sharding = replicated
  train_fn = jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, metric_sharding), donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(eval_step, model_config=model_config,
                                      scan_placement=placement),
                    in_shardings=(param_shardings, batch_shardings), out_shardings=metric_sharding)
  grad_fn = jax.jit(functools.partial(compute_gradients, model_config=model_config,
                                      opt_config=opt_config, param_logical_axes=logical,
                                      scan_placement=placement),
                    in_shardings=(param_shardings, batch_shardings),
                    out_shardings=(param_shardings, metric_sharding))
  return StepFunctions(
      model_config=model_config, opt_config=opt_config, mesh=mesh, strategy=strategy, rules=rules,
      scan_placement=placement, tx=tx, param_logical_axes=logical, abstract_state=abstract_state,
      state_shardings=state_shardings, batch_shardings=batch_shardings, init_fn=_InMeshContext(init_fn, mesh, rules),
      train_fn=_InMeshContext(train_fn, mesh, rules), eval_fn=_InMeshContext(eval_fn, mesh, rules),
      grad_fn=_InMeshContext(grad_fn, mesh, rules))
