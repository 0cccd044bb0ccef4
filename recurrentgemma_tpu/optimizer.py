"""AdamW with warm-up + cosine schedule, global-norm clipping and a weight-decay mask by logical axes."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

import pallas_kernels
from sharding import rules as rules_lib

MU_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW, schedule, clipping and accumulation (fields documented in configs/base.py)."""

  learning_rate: float = 3e-4
  warmup_steps: int = 1000
  decay_steps: int = 10_000  # configs/base.py's 0 (follow the run) at its train.steps
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
  return jax.tree.map(decays, logical_axes, is_leaf=rules_lib.is_axes_leaf)


def _adamw(c: OptimizerConfig, logical_axes: Any) -> optax.GradientTransformation:
  return optax.adamw(
      learning_rate_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
      mask=weight_decay_mask(logical_axes), mu_dtype=MU_DTYPES[c.mu_dtype])


def make_optimizer(c: OptimizerConfig, logical_axes: Any) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with the schedule and the weight-decay mask.

  Its `init` defines the optimizer state; the train step updates with `apply_update` (the same
  arithmetic, one layer group at a time).
  """
  adamw = _adamw(c, logical_axes)
  if c.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), adamw)
  return adamw


def stacked_leaves(logical_axes: Any) -> Any:
  """True for the parameters stacked over scanned layer groups (leading logical axis `layers`)."""
  return jax.tree.map(lambda axes: bool(axes) and axes[0] == "layers", logical_axes,
                      is_leaf=rules_lib.is_axes_leaf)


def apply_update(c: OptimizerConfig, logical_axes: Any, grads: Any, opt_state: Any, params: Any,
                 *, per_group: bool | None = None) -> tuple[Any, Any]:
  """`make_optimizer(c, logical_axes).update` then `optax.apply_updates`: (new params, new state).

  Once the gradients' global norm is known the update is element-wise, so with `per_group` the
  parameters stacked over layer groups are updated one group at a time (`lax.map` over their
  leading axis), with the same arithmetic. Fused over a whole stacked leaf, the update made the TPU
  compiler emit straight-line code for every tile of the leaf (~70,000 instructions for one small
  leaf) and compile the largest ones two more times after running out of vector memory. On CPU
  the loop costs more than it saves (dynamic slices, smaller fused loops), so the default
  (`per_group=None`) is whole leaves on the CPU backend and per group elsewhere.
  """
  if per_group is None:
    return pallas_kernels.platform_dependent(
        grads, opt_state, params,
        cpu=functools.partial(apply_update, c, logical_axes, per_group=False),
        default=functools.partial(apply_update, c, logical_axes, per_group=True))
  adamw = _adamw(c, logical_axes)
  if c.grad_clip_norm > 0:
    clip_state, adam_state = opt_state
    # optax.clip_by_global_norm's arithmetic, applied leaf by leaf with the global norm.
    g_norm = optax.tree.norm(grads)
    trigger = jnp.squeeze(g_norm < c.grad_clip_norm)
    clip = lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * c.grad_clip_norm)
  else:
    adam_state, clip = opt_state, lambda t: t

  g, treedef = jax.tree.flatten(grads)
  p = treedef.flatten_up_to(params)
  # Leaves updated one layer group at a time (none without per_group).
  flags = [f and per_group for f in treedef.flatten_up_to(stacked_leaves(logical_axes))]
  st, st_def = jax.tree.flatten(adam_state)
  # Which state leaves are moments of which parameter (-1: counts and other scalars).
  owner = st_def.flatten_up_to(optax.tree_map_params(
      adamw, lambda _, i: i, adam_state, jax.tree.unflatten(treedef, list(range(len(g)))),
      transform_non_params=lambda _: -1, is_leaf=lambda x: isinstance(x, int)))
  st_flags = [i >= 0 and flags[i] for i in owner]

  def step(g_leaves, st_leaves, p_leaves):
    p_tree = jax.tree.unflatten(treedef, p_leaves)
    updates, new_st = adamw.update(jax.tree.map(clip, jax.tree.unflatten(treedef, g_leaves)),
                                   jax.tree.unflatten(st_def, st_leaves), p_tree)
    return (treedef.flatten_up_to(optax.apply_updates(p_tree, updates)),
            st_def.flatten_up_to(new_st))

  stand_in = lambda x: jnp.zeros((), x.dtype)  # for a leaf the other call updates
  only = lambda leaves, leaf_flags: [x for x, f in zip(leaves, leaf_flags) if f]
  # The leaves that are not stacked, and the scalar state (step counts), in one call; the stacked
  # leaves enter it as scalar stand-ins whose results are dropped.
  new_p, new_st = step([stand_in(x) if f else x for x, f in zip(g, flags)],
                       [stand_in(x) if f else x for x, f in zip(st, st_flags)],
                       [stand_in(x) if f else x for x, f in zip(p, flags)])
  if any(flags):
    def one_group(xs):
      g_i, st_i, p_i = (iter(v) for v in xs)
      out_p, out_st = step(
          [next(g_i) if f else stand_in(x) for x, f in zip(g, flags)],
          [next(st_i) if f else (stand_in(x) if i >= 0 else x)
           for x, f, i in zip(st, st_flags, owner)],
          [next(p_i) if f else stand_in(x) for x, f in zip(p, flags)])
      return only(out_p, flags), only(out_st, st_flags)
    group_p, group_st = jax.lax.map(one_group, (only(g, flags), only(st, st_flags), only(p, flags)))
    group_p, group_st = iter(group_p), iter(group_st)
    new_p = [next(group_p) if f else x for x, f in zip(new_p, flags)]
    new_st = [next(group_st) if f else x for x, f in zip(new_st, st_flags)]
  new_adam_state = jax.tree.unflatten(st_def, new_st)
  new_opt_state = (clip_state, new_adam_state) if c.grad_clip_norm > 0 else new_adam_state
  return jax.tree.unflatten(treedef, new_p), new_opt_state
