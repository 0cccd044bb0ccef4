"""The Griffin / Hawk / MQA network: residual blocks, layer groups scanned over, the full model.

Parameter layout (all families): {"embedder", "final_norm", "groups", "remainder"?}.
`groups` holds one sub-tree per position of `block_pattern` ("block_0", "block_1", ...), each leaf
stacked over the num_groups repetitions (leading logical axis "layers"); `remainder` holds the
trailing blocks that do not fill a group (e.g. 26 = 8 x (R, R, A) + (R, R) for RecurrentGemma-2B).
`scan_layers=False` keeps the same layout and fully unrolls the loop, so checkpoints move freely
between the two settings.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import pallas_kernels
from recurrentgemma_tpu.model.attention import AttentionBlock
from recurrentgemma_tpu.model.config import RECURRENT, ModelConfig
from recurrentgemma_tpu.model.layers import Embedder, MLPBlock, RMSNorm, constrain
from recurrentgemma_tpu.model.rglru import RecurrentBlock, Segments

ACT_AXES = ("batch", "length", "embed")

_REMAT_POLICIES = {
    "block": None,  # save nothing inside a block: recompute it all on the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class ResidualBlock(nn.Module):
  """x + Mix(RMSNorm(x)), then + MLP(RMSNorm(.)); Mix is recurrent or attention."""

  config: ModelConfig
  block_type: str
  scan_placement: pallas_kernels.ScanPlacement | None = None  # see rglru.RGLRU

  @nn.compact
  def __call__(self, x_BTD: jax.Array, seg: Segments, cache: Any,
               num_tokens_B: jax.Array | None) -> tuple[jax.Array, Any]:
    cfg = self.config
    x_BTD = constrain(x_BTD, ACT_AXES)
    h = RMSNorm(cfg, name="temporal_pre_norm")(x_BTD)
    if self.block_type == RECURRENT:
      h, new_cache = RecurrentBlock(cfg, self.scan_placement, name="recurrent_block")(h, seg, cache)
    else:
      h, new_cache = AttentionBlock(cfg, self.block_type, name="attention_block")(
          h, seg, cache, num_tokens_B)
    residual = constrain(h + x_BTD, ACT_AXES)
    out = MLPBlock(cfg, name="mlp_block")(RMSNorm(cfg, name="channel_pre_norm")(residual))
    out = constrain(out + residual, ACT_AXES)
    # A cache goes out only if one came in: in training no per-layer state is kept alive.
    return out, (None if cache is None else new_cache)


def _block_class(cfg: ModelConfig, in_scan: bool):
  if cfg.remat == "none":
    return ResidualBlock
  # Inside lax.scan, XLA cannot CSE the recomputation away, so the barriers are not needed.
  return nn.remat(ResidualBlock, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not in_scan)


class BlockGroup(nn.Module):
  """One repetition of block_pattern (or the remainder): blocks applied in order.

  The (carry, scanned, broadcast...) argument order is what nn.scan expects.
  """

  config: ModelConfig
  block_types: tuple[str, ...]
  in_scan: bool = False
  scan_placement: pallas_kernels.ScanPlacement | None = None

  @nn.compact
  def __call__(self, x_BTD: jax.Array, cache: Any, seg: Segments,
               num_tokens_B: jax.Array | None) -> tuple[jax.Array, Any]:
    block_cls = _block_class(self.config, self.in_scan)
    new_cache = {}
    for i, block_type in enumerate(self.block_types):
      name = f"block_{i}"
      # The remainder's last block is the model's last: its backward runs right after its
      # forward (only the final norm and the loss in between), so it is not rematerialised. On
      # the Griffin-14B step that saves 0.4 GiB of temporaries per chip, 0.5% of the FLOPs and a
      # second compile of the block's forward (docs/benchmarks.md, "Compile time of the 14B preset").
      last = not self.in_scan and i == len(self.block_types) - 1
      x_BTD, new_cache[name] = (ResidualBlock if last else block_cls)(
          self.config, block_type, self.scan_placement, name=name)(
              x_BTD, seg, None if cache is None else cache[name], num_tokens_B)
    return x_BTD, (None if cache is None else new_cache)


class Griffin(nn.Module):
  """Embed -> num_layers residual blocks -> RMSNorm -> tied unembedding (+ optional soft-cap).

  Attributes:
    config: the model.
    scan_placement: where the RG-LRU scan runs on a mesh (passed down to every `RGLRU`), or None.
  """

  config: ModelConfig
  scan_placement: pallas_kernels.ScanPlacement | None = None

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, seg: Segments, cache: dict | None = None,
               num_tokens_B: jax.Array | None = None,
               unembed: bool = True) -> tuple[jax.Array, dict | None]:
    """Logits [B, T, V] (or, with unembed=False, the final-normed activations [B, T, D])."""
    cfg = self.config
    embedder = Embedder(cfg, name="embedder")
    x = constrain(embedder.encode(tokens_BT), ACT_AXES)
    new_cache = {}
    if cfg.num_groups:
      # Scanning (R, R, A) groups rather than single layers keeps one compiled body for every
      # family, and the body is compiled once however deep the model is.
      scan = nn.scan(
          BlockGroup,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast),
          out_axes=0,
          length=cfg.num_groups,
          unroll=1 if cfg.scan_layers else cfg.num_groups,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      groups = scan(cfg, cfg.block_pattern, in_scan=True, scan_placement=self.scan_placement,
                    name="groups")
      x, new_cache["groups"] = groups(
          x, None if cache is None else cache["groups"], seg, num_tokens_B)
    if cfg.remainder_types:
      remainder = BlockGroup(cfg, cfg.remainder_types, scan_placement=self.scan_placement,
                             name="remainder")
      x, new_cache["remainder"] = remainder(
          x, None if cache is None else cache["remainder"], seg, num_tokens_B)
    x = RMSNorm(cfg, name="final_norm")(x)
    if not unembed:  # the fused loss (recurrentgemma_tpu/loss.py) unembeds chunk by chunk
      return x, (None if cache is None else new_cache)
    logits = embedder.decode(x)
    if cfg.logits_soft_cap:
      c = cfg.logits_soft_cap
      logits = jnp.tanh(logits / c) * c
    logits = constrain(logits, ("batch", "length", "vocab"))
    return logits, (None if cache is None else new_cache)


@functools.lru_cache(maxsize=None)
def module_for(config: ModelConfig,
               scan_placement: pallas_kernels.ScanPlacement | None = None) -> Griffin:
  return Griffin(config, scan_placement)
