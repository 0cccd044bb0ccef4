"""Shared building blocks: initialisers, RMSNorm, the tied embedder and the gated GeLU MLP.

Every parameter is created through `param()`, which attaches its logical axis names (the design's
alphabet) so `sharding/` can place it; `init_params` strips the boxes to plain arrays.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrentgemma_tpu.model.config import ModelConfig

Axes = tuple[str | None, ...]


def lecun_normal(scale: float = 1.0, in_axis: int | Sequence[int] = -2,
                 out_axis: int | Sequence[int] = -1) -> nn.initializers.Initializer:
  """Untruncated fan-in normal, as the reference code uses for every dense weight."""
  return nn.initializers.variance_scaling(scale, "fan_in", "normal", in_axis=in_axis,
                                          out_axis=out_axis)


def param(module: nn.Module, name: str, init: nn.initializers.Initializer, shape: Sequence[int],
          axes: Axes, dtype: Any) -> jax.Array:
  """Creates a parameter carrying logical axis names (unboxed to a plain array on use)."""
  if len(axes) != len(shape):
    raise ValueError(f"{name}: axes {axes} do not match shape {tuple(shape)}")
  boxed = module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), dtype)
  return nn.meta.unbox(boxed)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """Annotates an activation; a no-op unless sharding/ installs logical-axis rules."""
  return nn.with_logical_constraint(x, axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x / sqrt(mean(x^2) + eps) * (scale + 1), the variance in float32, in x's dtype.

  The hand-written backward pass keeps only x and one float32 rsqrt per row: autodiff keeps the
  normalised x and `scale + 1` broadcast to x's shape as well, which the CPU backend writes out as
  full [B, T, D] temporaries for every norm of the step.
  """
  return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
  x32 = x.astype(jnp.float32)
  inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  normed = (x32 * inv_rms).astype(x.dtype)
  return normed * (scale.astype(x.dtype) + 1), (x, inv_rms, scale)


def _rms_norm_bwd(eps, res, d_out):
  del eps
  x, inv_rms, scale = res
  x32 = x.astype(jnp.float32)
  normed = (x32 * inv_rms).astype(x.dtype)
  d_scale = jnp.sum((d_out * normed).astype(jnp.float32), axis=tuple(range(x.ndim - 1)))
  d_normed = (d_out * (scale.astype(x.dtype) + 1)).astype(jnp.float32)
  # d(x r)/dx with r = (mean(x^2) + eps)^(-1/2): r g - x r^3 mean(g x).
  mean_gx = jnp.mean(d_normed * x32, axis=-1, keepdims=True)
  d_x = inv_rms * (d_normed - x32 * jnp.square(inv_rms) * mean_gx)
  return d_x.astype(x.dtype), d_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class RMSNorm(nn.Module):
  """RMSNorm with the scale stored as an offset from 1 (zero init), eps 1e-6, like the reference."""

  config: ModelConfig
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    cfg = self.config
    scale_D = param(self, "scale", nn.initializers.zeros_init(), (cfg.width,), ("embed",),
                    cfg.parameter_dtype)
    return rms_norm(x_BTD.astype(cfg.compute_dtype), scale_D, self.eps)


class Embedder(nn.Module):
  """Tied input embedding and output projection."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0)
    self.table_VD = param(self, "input_embedding", init, (cfg.vocab_size, cfg.width),
                          ("vocab", "embed"), cfg.parameter_dtype)

  def encode(self, tokens_BT: jax.Array) -> jax.Array:
    cfg = self.config
    x_BTD = jnp.take(self.table_VD, tokens_BT, axis=0).astype(cfg.compute_dtype)
    if cfg.embeddings_scale_by_sqrt_dim:
      # The published models were trained with the factor rounded to bfloat16; keeping that
      # rounding is what makes their checkpoints reproduce the reference logits.
      x_BTD = x_BTD * jnp.asarray(cfg.embed_scale, jnp.bfloat16).astype(cfg.compute_dtype)
    return x_BTD

  def decode(self, x_BTD: jax.Array) -> jax.Array:
    cfg = self.config
    table = self.table_VD.astype(cfg.compute_dtype)
    return jnp.einsum("btd,vd->btv", x_BTD, table, preferred_element_type=jnp.float32)


class MLPBlock(nn.Module):
  """Gated GeLU MLP: gelu(x W_gate) * (x W_up), then W_down; expansion `mlp_expansion`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    cfg = self.config
    D, F = cfg.width, cfg.mlp_width
    pd, cd = cfg.parameter_dtype, cfg.compute_dtype
    # [0] is the GeLU (gate) branch, [1] the linear branch: the reference's `ffw_up` layout.
    w_up = param(self, "ffw_up_w", lecun_normal(in_axis=1, out_axis=2), (2, D, F),
                 (None, "embed", "mlp"), pd)
    b_up = param(self, "ffw_up_b", nn.initializers.zeros_init(), (2, F), (None, "mlp"), pd)
    w_down = param(self, "ffw_down_w", lecun_normal(cfg.final_w_init_variance_scale), (F, D),
                   ("mlp", "embed"), pd)
    b_down = param(self, "ffw_down_b", nn.initializers.zeros_init(), (D,), ("embed",), pd)
    x = x_BTD.astype(cd)
    w_up, b_up = w_up.astype(cd), b_up.astype(cd)
    # Two plain matmuls rather than one einsum over the stacked [2, D, F] weight: the stacked
    # form lowers to a batched dot plus transposes, ~3x slower on the CPU backend.
    gate_BTF = jnp.einsum("btd,df->btf", x, w_up[0]) + b_up[0]
    up_BTF = jnp.einsum("btd,df->btf", x, w_up[1]) + b_up[1]
    h_BTF = jax.nn.gelu(gate_BTF) * up_BTF
    h_BTF = constrain(h_BTF, ("batch", "length", "mlp"))
    return jnp.einsum("btf,fd->btd", h_BTF, w_down.astype(cd)) + b_down.astype(cd)
