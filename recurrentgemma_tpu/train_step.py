"""The pure train and eval steps: loss, gradient accumulation over micro-batches, one AdamW update.

A batch is the dict of docs/architecture.md: `inputs`, `targets`, `segment_ids`, `positions` (int32) and
`loss_weights` (float32), all `[batch, time]`. The loss is the cross-entropy summed over tokens with
their `loss_weights` and divided by the sum of the weights over the whole global batch, so splitting
the batch into micro-batches (gradient accumulation) gives the same loss and gradients as one pass.

Metrics of `train_step` (float32 scalars): `loss` (cross-entropy per weighted token), `z_loss` (its
mean (log Z)^2 term, before the coefficient), `total_loss` (what is differentiated), `grad_norm`
(global norm before clipping), `param_norm`, `learning_rate` (the rate used by this step),
`num_tokens` (sum of loss weights), `accuracy` (argmax == target, weighted).

Static values (model and optimizer configs, the parameters' logical axes, the scan placement) are
bound with `functools.partial`; `step_functions` jits the results with explicit shardings.
"""

import functools
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import pallas_kernels
from recurrentgemma_tpu import loss as loss_lib
from recurrentgemma_tpu import model as model_lib
from recurrentgemma_tpu import optimizer as optimizer_lib
from recurrentgemma_tpu.optimizer import OptimizerConfig, learning_rate_schedule

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")
BATCH_AXES = ("batch", "length")


@flax.struct.dataclass
class TrainState:
  """Everything a step updates. `step` counts optimizer updates (not micro-batches)."""

  step: jax.Array
  params: Any
  opt_state: Any


def init_state(rng: jax.Array, *, model_config: model_lib.ModelConfig,
               tx: optax.GradientTransformation) -> TrainState:
  """Fresh parameters and optimizer state (jit this with out_shardings; see StepFunctions)."""
  params = flax.core.meta.unbox(model_lib.init_params(model_config, rng))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


Placement = pallas_kernels.ScanPlacement | None


def token_losses(params: Any, batch: Batch, model_config: model_lib.ModelConfig,
                  scan_placement: Placement):
  """Per-token cross-entropy, log-normaliser and correctness, all [B, T] float32."""
  logits_BTV = model_lib.apply(params, model_config, batch["inputs"],
                               segment_ids=batch["segment_ids"], positions=batch["positions"],
                               scan_placement=scan_placement)
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  # A one-hot contraction instead of a gather: it partitions cleanly when `vocab` is sharded.
  onehot_BTV = jax.nn.one_hot(batch["targets"], logits_BTV.shape[-1], dtype=logits_BTV.dtype)
  target_logit_BT = jnp.einsum("btv,btv->bt", logits_BTV, onehot_BTV)
  correct_BT = (jnp.argmax(logits_BTV, axis=-1) == batch["targets"]).astype(jnp.float32)
  return log_z_BT - target_logit_BT, log_z_BT, correct_BT


def _loss_sums(params: Any, batch: Batch, total_weight: jax.Array, model_config: model_lib.ModelConfig,
               z_loss: float, scan_placement: Placement):
  """The objective's share of this (micro-)batch, normalised by the whole batch's weight."""
  ce_BT, log_z_BT, correct_BT = token_losses(params, batch, model_config, scan_placement)
  w_BT = batch["loss_weights"].astype(jnp.float32)
  ce = jnp.sum(ce_BT * w_BT) / total_weight
  zl = jnp.sum(jnp.square(log_z_BT) * w_BT) / total_weight
  acc = jnp.sum(correct_BT * w_BT) / total_weight
  return ce + z_loss * zl, (ce, zl, acc)


def _fused_loss_sums(params: Any, batch: Batch, total_weight: jax.Array,
                     model_config: model_lib.ModelConfig, z_loss: float, scan_placement: Placement):
  """`_loss_sums` with the unembedding fused into a chunked cross-entropy (`loss.py`)."""
  x_BTD = model_lib.features(params, model_config, batch["inputs"], segment_ids=batch["segment_ids"],
                             positions=batch["positions"], scan_placement=scan_placement)
  return loss_lib.unembed_cross_entropy(
      x_BTD, params["embedder"]["input_embedding"], batch["targets"], batch["loss_weights"],
      total_weight, soft_cap=model_config.logits_soft_cap, z_loss=z_loss)


def _loss_and_grad(model_config: model_lib.ModelConfig, z_loss: float, scan_placement: Placement):
  """(params, batch, total_weight) -> ((total, (ce, zl, acc)), grads).

  On CPU the fused, chunked loss (same values and gradients to float rounding; its [B, T, V] logits
  never reach DRAM, which bounds CPU speed); elsewhere the plain one, whose logits XLA shards over
  `vocab` and which the accelerator compiles have always used. Each branch is differentiated on its
  own, so only the lowered platform's branch (and its residuals) is in the compiled program.
  """
  def branch(fn):
    return jax.value_and_grad(functools.partial(fn, model_config=model_config, z_loss=z_loss,
                                                scan_placement=scan_placement), has_aux=True)

  def loss_and_grad(params, batch, total_weight):
    return pallas_kernels.platform_dependent(params, batch, total_weight,
                                             cpu=branch(_fused_loss_sums), default=branch(_loss_sums))
  return loss_and_grad


def _microbatches(batch: Batch, n: int) -> Batch:
  """[B, T] -> [n, B/n, T], taking rows j, n+j, 2n+j, ... into micro-batch j.

  Strided rows keep every micro-batch spread over all batch shards: with the batch sharded in
  contiguous row blocks, the reshape to [B/n, n, T] leaves the sharded axis first, so no data moves.
  """
  def split(x):
    return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
  return {k: split(v) for k, v in batch.items()}


def compute_gradients(params: Any, batch: Batch, *, model_config: model_lib.ModelConfig,
                      opt_config: OptimizerConfig, param_logical_axes: Any = None,
                      scan_placement: Placement = None) -> tuple[Any, Metrics]:
  """Gradients of the objective over one global batch, accumulated over micro-batches.

  Args:
    params: model parameters.
    batch: dict of [B, T] arrays (module docstring).
    model_config: the model.
    opt_config: its micro-batch count and z-loss coefficient are used.
    param_logical_axes: when given, gradient accumulators are constrained to the parameters'
      sharding, so XLA keeps them ZeRO-sharded instead of choosing a layout itself.
    scan_placement: where the RG-LRU scan runs on the mesh (see `model.apply`); None off a mesh.

  Returns:
    (grads with the params' dtypes, metrics `loss`, `z_loss`, `total_loss`, `accuracy`, `num_tokens`).
  """
  num_tokens = jnp.sum(batch["loss_weights"].astype(jnp.float32))
  total_weight = jnp.maximum(num_tokens, 1.0)
  loss_and_grad = _loss_and_grad(model_config, opt_config.z_loss, scan_placement)

  def constrain_like_params(tree):
    if param_logical_axes is None:
      return tree
    return nn.with_logical_constraint(tree, param_logical_axes)

  n = opt_config.num_microbatches
  if n == 1:
    (total, (ce, zl, acc)), grads = loss_and_grad(params, batch, total_weight)
  else:
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
               opt_config: OptimizerConfig, param_logical_axes: Any,
               scan_placement: Placement = None) -> tuple[TrainState, Metrics]:
  """One optimizer update on one global batch (pure; bind the keyword arguments with partial).

  Args:
    state: current TrainState.
    batch: dict of [B, T] arrays (module docstring).
    model_config: the model.
    opt_config: the optimizer (`optimizer.apply_update`), micro-batch count and z-loss coefficient.
    param_logical_axes: the parameters' logical axes (weight-decay mask, layer-group stacking;
      gradient accumulators are constrained to the parameters' sharding, see `compute_gradients`).
    scan_placement: see `compute_gradients`.

  Returns:
    (new state, metrics) as described in the module docstring.
  """
  grads, metrics = compute_gradients(state.params, batch, model_config=model_config,
                                     opt_config=opt_config, param_logical_axes=param_logical_axes,
                                     scan_placement=scan_placement)
  params, opt_state = optimizer_lib.apply_update(opt_config, param_logical_axes, grads,
                                                 state.opt_state, state.params)
  metrics = metrics | {
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(params),
      "learning_rate": jnp.asarray(learning_rate_schedule(opt_config)(state.step), jnp.float32),
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, *, model_config: model_lib.ModelConfig,
              scan_placement: Placement = None) -> Metrics:
  """Sums over one batch: `loss_sum`, `num_tokens`, `correct` (divide after summing batches)."""
  ce_BT, _, correct_BT = token_losses(params, batch, model_config, scan_placement)
  w_BT = batch["loss_weights"].astype(jnp.float32)
  return {"loss_sum": jnp.sum(ce_BT * w_BT), "num_tokens": jnp.sum(w_BT),
          "correct": jnp.sum(correct_BT * w_BT)}
