"""Optimizer, train state and the pure train / eval steps, shared by the training loop and the AOT compiler.

Public API (stable; the training loop and `recurrentgemma_tpu.compile` use exactly these):

  OptimizerConfig.from_config(config.optimizer) -> OptimizerConfig
  learning_rate_schedule(opt_config) -> optax.Schedule          # linear warmup, then cosine
  weight_decay_mask(logical_axes) -> pytree of bool              # no decay on norms, biases, RG-LRU
  make_optimizer(opt_config, logical_axes) -> optax.GradientTransformation
  TrainState(step, params, opt_state)                            # a flax struct (a pytree)
  compute_gradients(params, batch, *, model_config, opt_config) -> (grads, metrics)  # pure
  train_step(state, batch, *, model_config, opt_config, tx) -> (state, metrics)   # pure
  eval_step(params, batch, *, model_config) -> metrics                             # pure, sums
  StepFunctions / build_step_functions(model_config, opt_config, mesh, strategy)
      .create_state(rng) -> TrainState       # created already sharded (never a full host copy)
      .train_step(state, batch) -> (state, metrics)   # jitted, explicit shardings, state donated
      .eval_step(params, batch) -> metrics            # jitted
      .gradients(params, batch) -> (grads, metrics)   # jitted compute_gradients
      .shard_batch(local_batch) -> global batch       # process-local numpy -> global jax.Arrays
      .state_shardings, .batch_shardings, .param_logical_axes, .rules, .mesh, .tx, .abstract_state
      .abstract_batch(global_batch, seq_len) -> ShapeDtypeStructs with shardings
      .lower_train_step(global_batch, seq_len) -> jax.stages.Lowered  # for AOT compile, no data
      .state_logical_axes() / .state_report() -> every state array's axes, sharding, bytes per device
  from_config(config, mesh) -> StepFunctions   # reads config.model, config.optimizer, config.mesh
  create_mesh(config, devices=None) -> Mesh    # config.mesh over the devices
  check_batch_shape(global_batch, seq_len, mesh, num_microbatches, rules)   # raises before compiling

A batch is the dict of docs/architecture.md: `inputs`, `targets`, `segment_ids`, `positions` (int32) and
`loss_weights` (float32), all `[batch, time]`. The loss is the cross-entropy summed over tokens with
their `loss_weights` and divided by the sum of the weights over the whole global batch, so splitting
the batch into micro-batches (gradient accumulation) gives the same loss and gradients as one pass.

Metrics of `train_step` (float32 scalars): `loss` (cross-entropy per weighted token), `z_loss` (its
mean (log Z)^2 term, before the coefficient), `total_loss` (what is differentiated), `grad_norm`
(global norm before clipping), `param_norm`, `learning_rate` (the rate used by this step),
`num_tokens` (sum of loss weights), `accuracy` (argmax == target, weighted).
"""

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from recurrentgemma_tpu import model as model_lib
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")
BATCH_AXES = ("batch", "length")
MU_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW, schedule, clipping and accumulation (fields documented in configs/base.py)."""

  learning_rate: float = 3e-4
  warmup_steps: int = 1000
  decay_steps: int = 100_000
  final_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0
  z_loss: float = 0.0
  num_microbatches: int = 1
  mu_dtype: str = "float32"

  def __post_init__(self):
    if not self.learning_rate > 0:
      raise ValueError(f"optimizer.learning_rate={self.learning_rate} must be > 0")
    if self.warmup_steps < 0:
      raise ValueError(f"optimizer.warmup_steps={self.warmup_steps} must be >= 0")
    if self.decay_steps <= self.warmup_steps:
      raise ValueError(f"optimizer.decay_steps={self.decay_steps} must exceed warmup_steps="
                       f"{self.warmup_steps} (it is the length of the whole schedule)")
    if not 0.0 <= self.final_lr_ratio <= 1.0:
      raise ValueError(f"optimizer.final_lr_ratio={self.final_lr_ratio} must be in [0, 1]")
    if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
      raise ValueError(f"optimizer.b1={self.b1} and b2={self.b2} must be in [0, 1)")
    for name in ("eps", "weight_decay", "grad_clip_norm", "z_loss"):
      if getattr(self, name) < 0:
        raise ValueError(f"optimizer.{name}={getattr(self, name)} must be >= 0")
    if not isinstance(self.num_microbatches, int) or self.num_microbatches < 1:
      raise ValueError(f"optimizer.num_microbatches={self.num_microbatches} must be a positive integer")
    if self.mu_dtype not in MU_DTYPES:
      raise ValueError(f"optimizer.mu_dtype={self.mu_dtype!r} must be one of {tuple(MU_DTYPES)}")

  @classmethod
  def from_config(cls, c: Any) -> "OptimizerConfig":
    """Builds from `config.optimizer`; unknown fields are an error (typos cannot pass silently)."""
    items = dict(c.items())
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(items) - known)
    if unknown:
      raise ValueError(f"config.optimizer has unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**items)


@flax.struct.dataclass
class TrainState:
  """Everything a step updates. `step` counts optimizer updates (not micro-batches)."""

  step: jax.Array
  params: Any
  opt_state: Any


def learning_rate_schedule(c: OptimizerConfig) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to peak * final_lr_ratio at decay_steps.

  The update with step index k (0-based) uses the optax schedule's value at k + 1: optax's warmup starts
  at exactly 0, which would make the first update a no-op. So update k uses peak * (k + 1) / warmup
  during warmup, the peak at k + 1 = warmup_steps, and the final rate from k + 1 = decay_steps on.
  """
  base = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.learning_rate, warmup_steps=c.warmup_steps,
      decay_steps=c.decay_steps, end_value=c.learning_rate * c.final_lr_ratio)
  return lambda count: base(count + 1)


def _is_axes(x: Any) -> bool:
  return x is None or (type(x) is tuple and all(e is None or isinstance(e, str) for e in x))


def weight_decay_mask(logical_axes: Any) -> Any:
  """True for the parameters weight decay applies to.

  Decided from logical axes, not parameter names, so it follows the model without a name list:
  decay applies to weight matrices (two or more *named* axes besides the stacked `layers` axis) except
  the RG-LRU's block-diagonal gates (`rnn_block`). Norm scales, biases (including the MLP's stacked
  `[branch, mlp]` bias, whose branch axis is unnamed) and the RG-LRU's `a` parameter have one named
  axis and are excluded by that rule; the RecurrentGemma report trains the RG-LRU without decay.
  """
  def decays(axes):
    dims = [a for a in (axes or ()) if a is not None and a != "layers"]
    return len(dims) >= 2 and "rnn_block" not in dims
  return jax.tree.map(decays, logical_axes, is_leaf=_is_axes)


def make_optimizer(c: OptimizerConfig, logical_axes: Any) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with the schedule and the weight-decay mask."""
  adamw = optax.adamw(
      learning_rate_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
      mask=weight_decay_mask(logical_axes), mu_dtype=MU_DTYPES[c.mu_dtype])
  if c.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), adamw)
  return adamw


def init_state(rng: jax.Array, *, model_config: model_lib.ModelConfig,
               tx: optax.GradientTransformation) -> TrainState:
  """Fresh parameters and optimizer state (jit this with out_shardings; see StepFunctions)."""
  params = flax.core.meta.unbox(model_lib.init_params(model_config, rng))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _token_losses(params: Any, batch: Batch, model_config: model_lib.ModelConfig):
  """Per-token cross-entropy, log-normaliser and correctness, all [B, T] float32."""
  logits_BTV = model_lib.apply(params, model_config, batch["inputs"],
                               segment_ids=batch["segment_ids"], positions=batch["positions"])
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  # A one-hot contraction instead of a gather: it partitions cleanly when `vocab` is sharded.
  onehot_BTV = jax.nn.one_hot(batch["targets"], logits_BTV.shape[-1], dtype=logits_BTV.dtype)
  target_logit_BT = jnp.einsum("btv,btv->bt", logits_BTV, onehot_BTV)
  correct_BT = (jnp.argmax(logits_BTV, axis=-1) == batch["targets"]).astype(jnp.float32)
  return log_z_BT - target_logit_BT, log_z_BT, correct_BT


def _loss_sums(params: Any, batch: Batch, total_weight: jax.Array, model_config: model_lib.ModelConfig,
               z_loss: float):
  """The objective's share of this (micro-)batch, normalised by the whole batch's weight."""
  ce_BT, log_z_BT, correct_BT = _token_losses(params, batch, model_config)
  w_BT = batch["loss_weights"].astype(jnp.float32)
  ce = jnp.sum(ce_BT * w_BT) / total_weight
  zl = jnp.sum(jnp.square(log_z_BT) * w_BT) / total_weight
  acc = jnp.sum(correct_BT * w_BT) / total_weight
  return ce + z_loss * zl, (ce, zl, acc)


def _microbatches(batch: Batch, n: int) -> Batch:
  """[B, T] -> [n, B/n, T], taking rows j, n+j, 2n+j, ... into micro-batch j.

  Strided rows keep every micro-batch spread over all batch shards: with the batch sharded in
  contiguous row blocks, the reshape to [B/n, n, T] leaves the sharded axis first, so no data moves.
  """
  def split(x):
    return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
  return {k: split(v) for k, v in batch.items()}


def compute_gradients(params: Any, batch: Batch, *, model_config: model_lib.ModelConfig,
                      opt_config: OptimizerConfig,
                      param_logical_axes: Any = None) -> tuple[Any, Metrics]:
  """Gradients of the objective over one global batch, accumulated over micro-batches.

  Args:
    params: model parameters.
    batch: dict of [B, T] arrays (module docstring).
    model_config: the model.
    opt_config: its micro-batch count and z-loss coefficient are used.
    param_logical_axes: when given, gradient accumulators are constrained to the parameters'
      sharding, so XLA keeps them ZeRO-sharded instead of choosing a layout itself.

  Returns:
    (grads with the params' dtypes, metrics `loss`, `z_loss`, `total_loss`, `accuracy`, `num_tokens`).
  """
  num_tokens = jnp.sum(batch["loss_weights"].astype(jnp.float32))
  total_weight = jnp.maximum(num_tokens, 1.0)
  loss_and_grad = jax.value_and_grad(
      functools.partial(_loss_sums, model_config=model_config, z_loss=opt_config.z_loss), has_aux=True)

  def constrain_like_params(tree):
    if param_logical_axes is None:
      return tree
    return nn.with_logical_constraint(tree, param_logical_axes)

  n = opt_config.num_microbatches
  if n == 1:
    (total, (ce, zl, acc)), grads = loss_and_grad(params, batch, total_weight)
  else:
    if batch["inputs"].shape[0] % n:
      raise ValueError(f"batch of {batch['inputs'].shape[0]} rows does not split into "
                       f"optimizer.num_microbatches={n}")

    def accumulate(carry, micro):
      micro = {k: nn.with_logical_constraint(v, BATCH_AXES) for k, v in micro.items()}
      (t, aux), g = loss_and_grad(params, micro, total_weight)
      g_acc, sums = carry
      # float32 accumulators: summing bf16 gradients over many micro-batches loses precision.
      g_acc = constrain_like_params(jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g))
      return (g_acc, jax.tree.map(jnp.add, sums, (t,) + aux)), None

    zeros = constrain_like_params(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    sums0 = tuple(jnp.zeros((), jnp.float32) for _ in range(4))
    (grads, (total, ce, zl, acc)), _ = jax.lax.scan(accumulate, (zeros, sums0), _microbatches(batch, n))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  metrics = {"loss": ce, "z_loss": zl, "total_loss": total, "accuracy": acc, "num_tokens": num_tokens}
  return grads, metrics


def train_step(state: TrainState, batch: Batch, *, model_config: model_lib.ModelConfig,
               opt_config: OptimizerConfig, tx: optax.GradientTransformation,
               param_logical_axes: Any = None) -> tuple[TrainState, Metrics]:
  """One optimizer update on one global batch (pure; bind the keyword arguments with partial).

  Args:
    state: current TrainState.
    batch: dict of [B, T] arrays (module docstring).
    model_config: the model.
    opt_config: micro-batch count, z-loss coefficient and schedule are read from it.
    tx: the optimizer from `make_optimizer(opt_config, ...)`.
    param_logical_axes: see `compute_gradients`.

  Returns:
    (new state, metrics) as described in the module docstring.
  """
  grads, metrics = compute_gradients(state.params, batch, model_config=model_config,
                                     opt_config=opt_config, param_logical_axes=param_logical_axes)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = metrics | {
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(params),
      "learning_rate": jnp.asarray(learning_rate_schedule(opt_config)(state.step), jnp.float32),
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, *, model_config: model_lib.ModelConfig) -> Metrics:
  """Sums over one batch: `loss_sum`, `num_tokens`, `correct` (divide after summing batches)."""
  ce_BT, _, correct_BT = _token_losses(params, batch, model_config)
  w_BT = batch["loss_weights"].astype(jnp.float32)
  return {"loss_sum": jnp.sum(ce_BT * w_BT), "num_tokens": jnp.sum(w_BT),
          "correct": jnp.sum(correct_BT * w_BT)}


def check_batch_shape(global_batch: int, seq_len: int, mesh: jax.sharding.Mesh, num_microbatches: int,
                      rules: rules_lib.Rules) -> None:
  """Raises before any compile if the batch cannot be split over micro-batches and the mesh."""
  spec = rules_lib.logical_to_spec(BATCH_AXES, rules)
  def devices(entry):
    names = () if entry is None else ((entry,) if isinstance(entry, str) else entry)
    return int(np.prod([mesh.shape[a] for a in names]))
  batch_shards = devices(spec[0]) if len(spec) > 0 else 1
  seq_shards = devices(spec[1]) if len(spec) > 1 else 1
  if global_batch % num_microbatches:
    raise ValueError(f"global batch {global_batch} does not divide into optimizer.num_microbatches="
                     f"{num_microbatches}")
  micro = global_batch // num_microbatches
  if micro % batch_shards:
    raise ValueError(f"micro-batch of {micro} sequences (global batch {global_batch} / "
                     f"{num_microbatches} micro-batches) does not divide over the {batch_shards} batch "
                     f"shards of mesh axes {spec[0]}; use a batch that is a multiple of "
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
    with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
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

  def _check(self, batch: Batch, num_microbatches: int) -> None:
    b, t = batch["inputs"].shape
    check_batch_shape(b, t, self.mesh, num_microbatches, self.rules)

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """Jitted `train_step`; `state` is donated (do not reuse it after the call)."""
    self._check(batch, self.opt_config.num_microbatches)
    return self.train_fn(state, batch)

  def eval_step(self, params: Any, batch: Batch) -> Metrics:
    self._check(batch, 1)
    return self.eval_fn(params, batch)

  def gradients(self, params: Any, batch: Batch) -> tuple[Any, Metrics]:
    """Jitted `compute_gradients` with the training shardings (for inspection and tests)."""
    self._check(batch, self.opt_config.num_microbatches)
    return self.grad_fn(params, batch)

  def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Process-local numpy rows -> global arrays laid out as `batch_shardings`."""
    missing = [k for k in BATCH_KEYS if k not in local_batch]
    if missing:
      raise ValueError(f"batch is missing keys {missing}; a batch has {BATCH_KEYS}")
    return {k: jax.make_array_from_process_local_data(self.batch_shardings[k], np.asarray(local_batch[k]))
            for k in BATCH_KEYS}

  def state_logical_axes(self) -> TrainState:
    """Logical axes of every array in the state (optimizer moments follow their parameter)."""
    boxed = jax.tree.map(_Axes, self.param_logical_axes, is_leaf=_is_axes)
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

  Raises:
    ValueError: the strategy does not fit the mesh, or a parameter does not divide over its mesh
      axes (e.g. gate blocks not a multiple of `model`) — before anything is compiled.
  """
  rules = rules_lib.rules_for(strategy)
  rules_lib.check_strategy_mesh(strategy, dict(mesh.shape))
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
  step = functools.partial(train_step, model_config=model_config, opt_config=opt_config, tx=tx,
                           param_logical_axes=logical)
  metric_sharding = replicated
  train_fn = jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, metric_sharding), donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(eval_step, model_config=model_config),
                    in_shardings=(param_shardings, batch_shardings), out_shardings=metric_sharding)
  grad_fn = jax.jit(functools.partial(compute_gradients, model_config=model_config,
                                      opt_config=opt_config, param_logical_axes=logical),
                    in_shardings=(param_shardings, batch_shardings),
                    out_shardings=(param_shardings, metric_sharding))
  return StepFunctions(
      model_config=model_config, opt_config=opt_config, mesh=mesh, strategy=strategy, rules=rules,
      tx=tx, param_logical_axes=logical, abstract_state=abstract_state, state_shardings=state_shardings,
      batch_shardings=batch_shardings, init_fn=_InMeshContext(init_fn, mesh, rules),
      train_fn=_InMeshContext(train_fn, mesh, rules), eval_fn=_InMeshContext(eval_fn, mesh, rules),
      grad_fn=_InMeshContext(grad_fn, mesh, rules))


def from_config(config: Any, mesh: jax.sharding.Mesh) -> StepFunctions:
  """`build_step_functions` from a whole experiment config (model, optimizer, mesh groups)."""
  return build_step_functions(model_lib.ModelConfig.from_config(config.model),
                              OptimizerConfig.from_config(config.optimizer), mesh,
                              str(config.mesh.strategy))


def create_mesh(config: Any, devices: Any = None) -> jax.sharding.Mesh:
  """The mesh of `config.mesh` over `devices` (default: all devices)."""
  return mesh_lib.create_mesh(mesh_lib.MeshConfig.from_config(config.mesh), devices)
