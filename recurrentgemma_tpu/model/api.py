"""Functional entry points: init_params, apply, param_logical_axes, and cached decoding.

Parameters are a plain nested dict of arrays. Everything here is jit- and eval_shape-friendly;
shapes are checked eagerly so a bad call fails before any compile.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from recurrentgemma_tpu.model.attention import AttentionCache
from recurrentgemma_tpu.model.config import GLOBAL_ATTENTION, RECURRENT, ModelConfig
from recurrentgemma_tpu.model.griffin import module_for
from recurrentgemma_tpu.model.rglru import RecurrentCache, Segments

Params = dict[str, Any]
Cache = dict[str, Any]


def _check_tokens(tokens: Any, name: str = "tokens") -> tuple[int, int]:
  shape = np.shape(tokens)
  if len(shape) != 2:
    raise ValueError(f"{name} must be [batch, time]; got shape {shape}")
  if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
    raise ValueError(f"{name} must be integers; got dtype {jnp.result_type(tokens)}")
  return shape


def make_segments(batch: int, length: int, segment_ids: jax.Array | None = None,
                  positions: jax.Array | None = None) -> Segments:
  """Fills in whichever of segment_ids / positions is missing and marks document starts.

  A document starts where its position is 0 or where the segment id changes, so rows with only
  positions (the reference's convention) and rows with only segment ids both work.
  """
  for name, value in (("segment_ids", segment_ids), ("positions", positions)):
    if value is not None and np.shape(value) != (batch, length):
      raise ValueError(f"{name} must have the tokens' shape {(batch, length)}; "
                       f"got {np.shape(value)}")
  t = jnp.arange(length, dtype=jnp.int32)[None]
  if positions is None and segment_ids is None:
    positions = jnp.broadcast_to(t, (batch, length))
  if segment_ids is None:
    segment_ids = jnp.cumsum(positions == 0, axis=1, dtype=jnp.int32)
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  changed = jnp.concatenate(
      [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  if positions is None:
    last_start = jax.lax.cummax(jnp.where(changed, t, 0), axis=1)
    positions = t - last_start
  positions = jnp.asarray(positions, jnp.int32)
  # At t = 0 only a position of 0 is a start: a row may continue a document (e.g. chunked
  # prefill), and the reference also resets only where the position is 0.
  doc_start = (positions == 0) | (changed & (t > 0))
  doc_index = jnp.cumsum(doc_start, axis=1, dtype=jnp.int32)
  return Segments(segment_ids=segment_ids, positions=positions, doc_start=doc_start,
                  doc_index=doc_index)


def _init_boxed(config: ModelConfig, rng: jax.Array) -> Params:
  # Without a scan placement: parameters do not depend on where activations live.
  tokens = jnp.zeros((1, 1), jnp.int32)
  return module_for(config).init(rng, tokens, make_segments(1, 1))["params"]


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
  """Random parameters (float `param_dtype` arrays) following the reference initialisers."""
  if not isinstance(config, ModelConfig):
    raise TypeError(f"config must be a ModelConfig (use ModelConfig.from_config); got {type(config)}")
  if isinstance(rng, jax.core.Tracer) or jax.default_backend() != "cpu":
    return _init_jit(config, rng)  # inlined into the caller's jit / eval_shape, or on TPU/GPU
  return _cpu_init_executable(config, jax.typeof(rng))(rng)


# Initialisation runs once, and on the CPU backend XLA's optimisation of the many threefry
# graphs takes ~3x longer than running them unoptimised; values agree to float rounding.
_CPU_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                     "xla_llvm_disable_expensive_passes": True}


@functools.lru_cache(maxsize=32)
def _cpu_init_executable(config: ModelConfig, rng_type: Any):
  return _init_jit.lower(config, jax.ShapeDtypeStruct(rng_type.shape, rng_type.dtype)).compile(
      compiler_options=_CPU_FAST_COMPILE)


# Jitted inside so that eager calls compile once instead of dispatching hundreds of small ops;
# under an outer jit / eval_shape these simply inline.
@functools.partial(jax.jit, static_argnums=0)
def _init_jit(config: ModelConfig, rng: jax.Array) -> Params:
  return nn.meta.unbox(_init_boxed(config, rng))


def param_logical_axes(config: ModelConfig) -> Params:
  """A pytree like the params whose leaves are tuples of logical axis names (or None)."""
  boxed = jax.eval_shape(lambda: _init_boxed(config, jax.random.PRNGKey(0)))
  specs = nn.get_partition_spec(boxed)
  return jax.tree.map(lambda s: tuple(s), specs,
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def apply(params: Params, config: ModelConfig, tokens: jax.Array, *,
          segment_ids: jax.Array | None = None,
          positions: jax.Array | None = None,
          scan_placement: pallas_kernels.ScanPlacement | None = None) -> jax.Array:
  """Full-sequence forward pass.

  Args:
    params: from init_params (or an imported checkpoint).
    config: the model's ModelConfig.
    tokens: int [B, T].
    segment_ids: optional int [B, T], document number within a packed row (0 = padding).
    positions: optional int [B, T], position within each document (restarts at 0).
    scan_placement: where the RG-LRU scan's operands live on a mesh (the step builder derives it
      from the mesh and rules); None runs the plain scan.

  Returns:
    float32 logits [B, T, vocab_size].
  """
  B, T = _check_tokens(tokens)
  if not isinstance(config, ModelConfig):
    raise TypeError(f"config must be a ModelConfig; got {type(config)}")
  for name, value in (("segment_ids", segment_ids), ("positions", positions)):
    if value is not None and np.shape(value) != (B, T):
      raise ValueError(f"{name} must have the tokens' shape {(B, T)}; got {np.shape(value)}")
  return _apply_jit(params, config, tokens, segment_ids, positions, scan_placement)


@functools.partial(jax.jit, static_argnums=(1, 5))
def _apply_jit(params, config, tokens, segment_ids, positions, scan_placement):
  B, T = tokens.shape
  seg = make_segments(B, T, segment_ids, positions)
  logits, _ = module_for(config, scan_placement).apply({"params": params}, tokens, seg)
  return logits.astype(jnp.float32)


def features(params: Params, config: ModelConfig, tokens: jax.Array, *,
             segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
             scan_placement: pallas_kernels.ScanPlacement | None = None) -> jax.Array:
  """`apply` up to the final norm: activations [B, T, width] in the compute dtype.

  The logits are `einsum("btd,vd->btv", features, params["embedder"]["input_embedding"])` (then
  the soft-cap); `recurrentgemma_tpu.loss` computes the training loss from these chunk by chunk.
  """
  B, T = _check_tokens(tokens)
  for name, value in (("segment_ids", segment_ids), ("positions", positions)):
    if value is not None and np.shape(value) != (B, T):
      raise ValueError(f"{name} must have the tokens' shape {(B, T)}; got {np.shape(value)}")
  return _features_jit(params, config, tokens, segment_ids, positions, scan_placement)


@functools.partial(jax.jit, static_argnums=(1, 5))
def _features_jit(params, config, tokens, segment_ids, positions, scan_placement):
  B, T = tokens.shape
  seg = make_segments(B, T, segment_ids, positions)
  x, _ = module_for(config, scan_placement).apply({"params": params}, tokens, seg, unembed=False)
  return x


# ----------------------------------------------------------------------------- decoding cache


def _block_cache(config: ModelConfig, block_type: str, batch: int, max_length: int):
  cd = config.compute_dtype
  if block_type == RECURRENT:
    return RecurrentCache(
        rg_lru=jnp.zeros((batch, config.lru_width_), jnp.float32),
        conv=jnp.zeros((batch, config.conv_width - 1, config.lru_width_), cd))
  # Local layers keep at most `window` keys (the current token is the window's +1-th);
  # global layers keep everything up to max_length.
  size = max_length if block_type == GLOBAL_ATTENTION else min(config.attention_window, max_length)
  return AttentionCache(k=jnp.zeros((batch, size, config.head_dim_), cd),
                        v=jnp.zeros((batch, size, config.head_dim_), cd))


def init_cache(config: ModelConfig, batch_size: int, max_length: int) -> Cache:
  """An empty decoding cache for rows of up to `max_length` tokens.

  Recurrent layers: RG-LRU state (float32) and the last conv_width - 1 conv inputs; local
  attention: a ring buffer of min(window, max_length) keys/values; global attention: max_length.
  """
  if batch_size < 1 or max_length < 1:
    raise ValueError(f"batch_size={batch_size} and max_length={max_length} must be positive")
  cache: Cache = {"num_tokens": jnp.zeros((batch_size,), jnp.int32)}
  if config.num_groups:
    group = {f"block_{i}": _block_cache(config, t, batch_size, max_length)
             for i, t in enumerate(config.block_pattern)}
    cache["groups"] = jax.tree.map(
        lambda x: jnp.broadcast_to(x, (config.num_groups,) + x.shape), group)
  if config.remainder_types:
    cache["remainder"] = {f"block_{i}": _block_cache(config, t, batch_size, max_length)
                          for i, t in enumerate(config.remainder_types)}
  return cache


def decode(params: Params, config: ModelConfig, tokens: jax.Array,
           cache: Cache) -> tuple[jax.Array, Cache]:
  """Runs a chunk of T >= 1 new tokens per row on top of `cache` (prefill or one decode step).

  Each row is one document continuing from `cache["num_tokens"]`; the result equals the
  corresponding slice of `apply` on the whole row. Chunking a long prompt into pieces of at most
  the window keeps memory at O(chunk x (window + chunk)).

  Returns:
    (float32 logits [B, T, V], the updated cache).
  """
  B, T = _check_tokens(tokens)
  if cache["num_tokens"].shape != (B,):
    raise ValueError(f"cache is for batch {cache['num_tokens'].shape}, tokens are batch {B}")
  return _decode_jit(params, config, tokens, cache)


@functools.partial(jax.jit, static_argnums=1)
def _decode_jit(params, config, tokens, cache):
  B, T = tokens.shape
  num_tokens = cache["num_tokens"]
  positions = num_tokens[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
  doc_start = positions == 0
  seg = Segments(segment_ids=jnp.ones((B, T), jnp.int32), positions=positions,
                 doc_start=doc_start, doc_index=jnp.cumsum(doc_start, axis=1, dtype=jnp.int32))
  layers = {k: v for k, v in cache.items() if k != "num_tokens"}
  logits, new_layers = module_for(config).apply({"params": params}, tokens, seg, layers,
                                                num_tokens)
  return logits.astype(jnp.float32), {"num_tokens": num_tokens + T, **new_layers}
