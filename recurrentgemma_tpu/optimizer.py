"""AdamW with warm-up + cosine schedule, global-norm clipping and a weight-decay mask by logical axes."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sharding import rules as rules_lib

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


def make_optimizer(c: OptimizerConfig, logical_axes: Any) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with the schedule and the weight-decay mask."""
  adamw = optax.adamw(
      learning_rate_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
      mask=weight_decay_mask(logical_axes), mu_dtype=MU_DTYPES[c.mu_dtype])
  if c.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), adamw)
  return adamw
