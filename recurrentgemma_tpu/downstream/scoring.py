"""Scores and extends token sequences with the JAX model on the job's mesh (no lm-eval here).

Three operations, each batched into a few fixed shapes so that a whole task compiles a handful of
programs:

* `Scorer.score` — log p(s[t] | s[:t]) summed over the last `n` tokens of each sequence, and
  whether every one of them is the argmax. Sequences are packed first-fit into rows of `row_len`
  tokens, each a document of its own (`segment_ids` numbers them, `positions` restart at 0), so the
  model's document resets keep them independent; rows go through the training mesh's jitted
  per-token loss with the training shardings.
* `Scorer.score_shared` — one context, several continuations (a multiple-choice question): the
  context runs once through `model.decode`, and its decoding cache (RG-LRU state, conv tail,
  local-attention window) is copied to one row per continuation, which then runs only its own
  tokens. A recurrent model's state is the same size whatever the context length, so each extra
  choice costs its own tokens only.
* `Scorer.generate` — greedy continuation from a batch of contexts, with the same cache.

Contexts of different lengths share a decode batch by left padding. The pads get negative positions
(the cache's token count starts at -pad), so the first real token has position 0: the recurrence and
the conv window reset there, pad keys are masked out of attention, and only the conv tail of a
context shorter than the conv window still holds pad inputs, which `_clear_pad_history` zeroes —
exactly the state a context run alone from an empty cache ends in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from recurrentgemma_tpu import model as model_lib
from recurrentgemma_tpu import step_functions
from recurrentgemma_tpu import train_step as train_step_lib
from recurrentgemma_tpu.model.attention import AttentionCache
from recurrentgemma_tpu.model.rglru import RecurrentCache
from sharding import rules as rules_lib

# Lengths are rounded up to powers of two (at least this) so a task compiles few shapes.
MIN_BUCKET = 16
# Contexts are prefilled in chunks of at most this many tokens: attention and logits memory stay
# O(chunk x (window + chunk)) however long the context.
PREFILL_CHUNK = 256


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """The smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(n - 1, 0).bit_length())


def pack(lengths: Sequence[int], row_len: int) -> list[list[int]]:
  """First-fit-decreasing packing: rows of sequence indices whose lengths sum to <= row_len."""
  rows: list[list[int]] = []
  free: list[int] = []
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    if not 0 < lengths[i] <= row_len:
      raise ValueError(f"sequence {i} has {lengths[i]} tokens; a row holds 1 to {row_len}")
    for r, space in enumerate(free):
      if lengths[i] <= space:
        rows[r].append(i)
        free[r] -= lengths[i]
        break
    else:
      rows.append([i])
      free.append(row_len - lengths[i])
  return rows


def _token_scores(params: Any, batch: dict[str, jax.Array], *, model_config: model_lib.ModelConfig,
                  scan_placement: Any) -> tuple[jax.Array, jax.Array]:
  """Per-token log-probability of the target and whether it is the argmax, [B, T] each."""
  ce_BT, _, correct_BT = train_step_lib.token_losses(params, batch, model_config, scan_placement)
  return -ce_BT, correct_BT > 0.5


def _take_rows(cache: model_lib.Cache, rows_N: jax.Array) -> model_lib.Cache:
  """The cache of rows `rows_N` (repeats allowed): batch is axis 1 under `groups`, else axis 0."""
  out = {"num_tokens": cache["num_tokens"][rows_N]}
  if "groups" in cache:
    out["groups"] = jax.tree.map(lambda x: jnp.take(x, rows_N, axis=1), cache["groups"])
  if "remainder" in cache:
    out["remainder"] = jax.tree.map(lambda x: jnp.take(x, rows_N, axis=0), cache["remainder"])
  return out


def _clear_pad_history(cache: model_lib.Cache, lengths_B: jax.Array) -> model_lib.Cache:
  """Zeroes conv-tail entries that hold left-padding inputs (rows shorter than the conv tail)."""

  def fix(block):
    if not isinstance(block, RecurrentCache):
      return block
    tail = block.conv.shape[-2]  # W - 1: slot i holds the input at position length - tail + i
    keep_BW = (lengths_B[:, None] - tail + jnp.arange(tail)[None]) >= 0
    return block._replace(conv=jnp.where(keep_BW[..., None], block.conv, 0).astype(block.conv.dtype))

  leaf = lambda x: isinstance(x, (RecurrentCache, AttentionCache))
  return {k: (v if k == "num_tokens" else jax.tree.map(fix, v, is_leaf=leaf))
          for k, v in cache.items()}


def _prefill(params: Any, config: model_lib.ModelConfig, ctx_BT: jax.Array, lengths_B: jax.Array,
             max_length: int) -> tuple[jax.Array, model_lib.Cache]:
  """Runs left-padded contexts into a fresh cache; (log-softmax after the last token [B, V], cache)."""
  B, T = ctx_BT.shape
  cache = model_lib.init_cache(config, B, max_length)
  cache["num_tokens"] = (lengths_B - T).astype(jnp.int32)  # the first real token gets position 0
  logits = None
  for lo in range(0, T, PREFILL_CHUNK):
    logits, cache = model_lib.decode(params, config, ctx_BT[:, lo:lo + PREFILL_CHUNK], cache)
  return jax.nn.log_softmax(logits[:, -1]), _clear_pad_history(cache, lengths_B)


def _shared_scores(params, ctx_GT, lengths_G, conts_NK, owner_N, *, config, max_length):
  """Log-probability and greedy flag of every continuation token [N, K] after its context."""
  last_GV, cache = _prefill(params, config, ctx_GT, lengths_G, max_length)
  first_NV = last_GV[owner_N]
  logp = [jnp.take_along_axis(first_NV, conts_NK[:, :1], axis=1)]
  greedy = [(jnp.argmax(first_NV, axis=-1) == conts_NK[:, 0])[:, None]]
  if conts_NK.shape[1] > 1:
    logits, _ = model_lib.decode(params, config, conts_NK[:, :-1], _take_rows(cache, owner_N))
    logp.append(jnp.take_along_axis(jax.nn.log_softmax(logits), conts_NK[:, 1:, None], axis=2)[..., 0])
    greedy.append(jnp.argmax(logits, axis=-1) == conts_NK[:, 1:])
  return jnp.concatenate(logp, axis=1), jnp.concatenate(greedy, axis=1)


def _greedy(params, ctx_BT, lengths_B, *, config, max_new_tokens):
  """Greedy continuation [B, max_new_tokens] of left-padded contexts."""
  last_BV, cache = _prefill(params, config, ctx_BT, lengths_B, ctx_BT.shape[1] + max_new_tokens)
  first_B = jnp.argmax(last_BV, axis=-1).astype(jnp.int32)

  def step(carry, _):
    token_B, cache = carry
    logits, cache = model_lib.decode(params, config, token_B[:, None], cache)
    return (jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache), token_B

  _, tokens_NB = jax.lax.scan(step, (first_B, cache), None, length=max_new_tokens)
  return tokens_NB.T


@dataclasses.dataclass(frozen=True)
class Scorer:
  """The model, its parameters on the training mesh, and the row shapes used to score with it.

  Attributes:
    fns: the run's step functions (mesh, logical-axis rules, parameter shardings, scan placement).
    params: parameters laid out with `fns.state_shardings.params`.
    row_len: tokens per packed row; longer sequences keep their last `row_len` inputs.
    batch_rows: rows per forward pass (rounded up to a multiple of the mesh's batch shards).
    pack: False gives every sequence a row of its own (the reference the packed rows must equal).
  """

  fns: step_functions.StepFunctions
  params: Any
  row_len: int
  batch_rows: int
  pack: bool = True

  def __post_init__(self):
    if self.row_len < 2:
      raise ValueError(f"row_len={self.row_len} must be >= 2")
    if self.batch_rows < 1:
      raise ValueError(f"batch_rows={self.batch_rows} must be >= 1")
    shards = self.batch_shards
    object.__setattr__(self, "batch_rows", -(-self.batch_rows // shards) * shards)

  @property
  def config(self) -> model_lib.ModelConfig:
    return self.fns.model_config

  @property
  def batch_shards(self) -> int:
    batch_axes, _ = rules_lib.dim_mesh_axes(train_step_lib.BATCH_AXES, self.fns.rules)
    return rules_lib.spec_devices(batch_axes, self.fns.mesh)

  @contextlib.contextmanager
  def _in_mesh(self):
    """The mesh and logical-axis rules the model's sharding annotations resolve against."""
    with jax.set_mesh(self.fns.mesh), nn.logical_axis_rules(self.fns.rules):
      yield

  @functools.cached_property
  def _score_fn(self):
    sharding = self.fns.batch_shardings["inputs"]
    fn = functools.partial(_token_scores, model_config=self.config,
                           scan_placement=self.fns.scan_placement)
    return jax.jit(fn, in_shardings=(self.fns.state_shardings.params,
                                     {k: sharding for k in train_step_lib.BATCH_KEYS}),
                   out_shardings=NamedSharding(self.fns.mesh, PartitionSpec()))

  @functools.cached_property
  def _shared_fn(self):
    return jax.jit(functools.partial(_shared_scores, config=self.config),
                   static_argnames=("max_length",),
                   out_shardings=NamedSharding(self.fns.mesh, PartitionSpec()))

  @functools.cached_property
  def _greedy_fn(self):
    return jax.jit(functools.partial(_greedy, config=self.config),
                   static_argnames=("max_new_tokens",),
                   out_shardings=NamedSharding(self.fns.mesh, PartitionSpec()))

  def _global(self, array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # Every process holds the same host array (lm-eval runs identically on each), so each
    # fills its own shards from it.
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  def _replicated(self, *arrays: np.ndarray) -> list[jax.Array]:
    replicated = NamedSharding(self.fns.mesh, PartitionSpec())
    return [self._global(a, replicated) for a in arrays]

  # ------------------------------------------------------------------ packed rows

  def score(self, sequences: Sequence[Sequence[int]], num_scored: Sequence[int]
            ) -> list[tuple[float, bool]]:
    """(sum of log p over the last num_scored[i] tokens of sequences[i], all of them argmax).

    Each sequence is a whole document starting with its first token (BOS); a sequence longer than
    row_len + 1 tokens is cut from the left, like lm-eval's own backends do.
    """
    if len(sequences) != len(num_scored):
      raise ValueError(f"{len(sequences)} sequences but {len(num_scored)} scored counts")
    seqs = [list(s)[-(self.row_len + 1):] for s in sequences]
    for i, (s, n) in enumerate(zip(seqs, num_scored)):
      if not 1 <= n < len(s):
        raise ValueError(f"sequence {i}: {n} scored tokens need a sequence of more than {n} "
                         f"tokens (it has {len(s)}, at most row_len + 1 = {self.row_len + 1})")
    lengths = [len(s) - 1 for s in seqs]  # inputs: all but the last token
    rows = pack(lengths, self.row_len) if self.pack else [[i] for i in range(len(seqs))]
    results: list[tuple[float, bool] | None] = [None] * len(seqs)
    B, L = self.batch_rows, self.row_len
    for first in range(0, len(rows), B):
      batch_rows = rows[first:first + B]
      arrays = {k: np.zeros((B, L), np.int32) for k in train_step_lib.BATCH_KEYS}
      arrays["loss_weights"] = np.zeros((B, L), np.float32)
      where = []
      for r, members in enumerate(batch_rows):
        offset = 0
        for doc, i in enumerate(members, start=1):
          s, n = seqs[i], lengths[i]
          span = slice(offset, offset + n)
          arrays["inputs"][r, span] = s[:-1]
          arrays["targets"][r, span] = s[1:]
          arrays["segment_ids"][r, span] = doc
          arrays["positions"][r, span] = np.arange(n)
          arrays["loss_weights"][r, offset + n - num_scored[i]:offset + n] = 1.0
          where.append((i, r, offset + n - num_scored[i], offset + n))
          offset += n
      sharding = self.fns.batch_shardings["inputs"]
      batch = {k: self._global(v, sharding) for k, v in arrays.items()}
      with self._in_mesh():
        logp, greedy = self._score_fn(self.params, batch)
      logp, greedy = np.asarray(logp), np.asarray(greedy)
      for i, r, lo, hi in where:
        results[i] = (float(np.sum(logp[r, lo:hi], dtype=np.float64)), bool(np.all(greedy[r, lo:hi])))
    return results  # type: ignore[return-value]

  # ------------------------------------------------------------------ shared contexts

  def score_shared(self, contexts: Sequence[Sequence[int]],
                   continuations: Sequence[Sequence[Sequence[int]]]) -> list[list[tuple[float, bool]]]:
    """For each context, (sum of log p, all argmax) of each of its continuations.

    The context runs once; its decoding cache is copied to one row per continuation.
    """
    if len(contexts) != len(continuations):
      raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuation lists")
    for g, (ctx, conts) in enumerate(zip(contexts, continuations)):
      if not ctx or not conts or not all(conts):
        raise ValueError(f"group {g}: a context and its continuations must all be non-empty")
    order = sorted(range(len(contexts)), key=lambda g: -len(contexts[g]))
    results: list[list[tuple[float, bool]]] = [[] for _ in contexts]
    G = self.batch_rows
    for first in range(0, len(order), G):
      groups = order[first:first + G]
      T = bucket(max(len(contexts[g]) for g in groups))
      if T > PREFILL_CHUNK:
        T = -(-T // PREFILL_CHUNK) * PREFILL_CHUNK
      ctx = np.zeros((G, T), np.int32)
      lengths = np.ones((G,), np.int32)  # unused rows: a one-token context
      rows = [(j, c) for j, g in enumerate(groups) for c in range(len(continuations[g]))]
      K = bucket(max(len(continuations[groups[j]][c]) for j, c in rows), 1)
      N = bucket(len(rows), 1)
      conts = np.zeros((N, K), np.int32)
      owner = np.zeros((N,), np.int32)
      for j, g in enumerate(groups):
        ctx[j, T - len(contexts[g]):] = contexts[g]
        lengths[j] = len(contexts[g])
      for n, (j, c) in enumerate(rows):
        cont = continuations[groups[j]][c]
        conts[n, :len(cont)] = cont
        owner[n] = j
      with self._in_mesh():
        logp, greedy = self._shared_fn(self.params, *self._replicated(ctx, lengths, conts, owner),
                                       max_length=T + K)
      logp, greedy = np.asarray(logp), np.asarray(greedy)
      for n, (j, c) in enumerate(rows):
        k = len(continuations[groups[j]][c])
        results[groups[j]].append((float(np.sum(logp[n, :k], dtype=np.float64)),
                                   bool(np.all(greedy[n, :k]))))
    return results

  # ------------------------------------------------------------------ generation

  def generate(self, contexts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of `max_new_tokens` tokens (the caller cuts at its stop sequences)."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    out: list[list[int]] = [[] for _ in contexts]
    B = self.batch_rows
    new = bucket(max_new_tokens, 1)
    for first in range(0, len(order), B):
      members = order[first:first + B]
      T = bucket(max(len(contexts[i]) for i in members))
      if T > PREFILL_CHUNK:
        T = -(-T // PREFILL_CHUNK) * PREFILL_CHUNK
      ctx = np.zeros((B, T), np.int32)
      lengths = np.ones((B,), np.int32)
      for j, i in enumerate(members):
        if not contexts[i]:
          raise ValueError(f"context {i} is empty; start it with BOS")
        ctx[j, T - len(contexts[i]):] = contexts[i]
        lengths[j] = len(contexts[i])
      with self._in_mesh():
        tokens = np.asarray(self._greedy_fn(self.params, *self._replicated(ctx, lengths),
                                            max_new_tokens=new))
      for j, i in enumerate(members):
        out[i] = tokens[j, :max_new_tokens].tolist()
    return out
