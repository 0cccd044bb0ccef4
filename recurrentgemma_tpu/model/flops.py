"""The one FLOP model of a Griffin / Hawk / MQA model, and its parameter counts.

Used by the training metrics (MFU), the compile report and planner (`recurrentgemma_tpu.compile`) and
`model.summary`. FLOPs are 2 per multiply-add of every matmul a token passes through: the weight
matrices (the tied embedding once, as the output projection; the input lookup is a gather) and the
attention score and value products over the keys a query really attends to. Element-wise work
(norms, gates' non-linearities, the Conv1D, the RG-LRU scan) is left out, as in the usual 6ND
accounting, so MFU is comparable with other reports.

Attended keys follow the model (model/attention.py): a query at position t of a row of T tokens
sees keys max(0, t - window) .. t, i.e. min(t, window) + 1 of them, in a local-attention block and
t + 1 in a global one. The blockwise implementation computes more products than that and masks
them; those are overhead, not model FLOPs (tests/test_flops.py ties both to the compiled program).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from recurrentgemma_tpu.model.config import GLOBAL_ATTENTION, LOCAL_ATTENTION, RECURRENT, ModelConfig

# Training = forward + backward, and the backward of a matmul is two matmuls of the same size.
TRAIN_MULTIPLIER = 3.0


def attended_keys(block_type: str, window: int, seq_len: int) -> float:
  """Mean number of keys a query attends to over positions 0 .. seq_len - 1 of a row."""
  if block_type == GLOBAL_ATTENTION:
    return (seq_len + 1) / 2.0
  if block_type != LOCAL_ATTENTION:
    raise ValueError(f"block_type={block_type!r} has no attention; expected {LOCAL_ATTENTION!r} or "
                     f"{GLOBAL_ATTENTION!r}")
  if window >= seq_len:
    return (seq_len + 1) / 2.0
  # Positions t < window see t + 1 keys; the other seq_len - window see window + 1.
  return (window * (window + 1) / 2.0 + (seq_len - window) * (window + 1)) / seq_len


@dataclasses.dataclass(frozen=True)
class ForwardFlops:
  """Forward FLOPs per token, split into weight matmuls and attention products."""

  weights: float  # 2 x the weights of every matrix a token passes (tied unembedding included)
  attention: float  # 2 x 2 x heads x head_dim per attended key (scores and values)

  @property
  def total(self) -> float:
    return self.weights + self.attention


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> ForwardFlops:
  """Forward matmul FLOPs per token of `config` at rows of `seq_len` tokens."""
  D, F, R = config.width, config.mlp_width, config.lru_width_
  H, K, N = config.num_heads, config.head_dim_, config.num_gate_blocks_
  mlp = 3 * D * F  # two up branches (gate, value) and one down
  recurrent = 3 * D * R + 2 * R * (R // N)  # linear_x, linear_y, linear_out; two block-diag gates
  attention_proj = D * H * K + 2 * D * K + H * K * D  # q, the shared k and v, out
  weights = config.vocab_size * D  # tied output projection
  attention = 0.0
  for block_type in config.block_types:
    weights += mlp
    if block_type == RECURRENT:
      weights += recurrent
    else:
      weights += attention_proj
      attention += 2 * H * K * attended_keys(block_type, config.attention_window, seq_len)
  return ForwardFlops(weights=2.0 * weights, attention=2.0 * attention)


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token: forward + backward = 3 x forward."""
  return TRAIN_MULTIPLIER * forward_flops_per_token(config, seq_len).total


def param_counts(config: ModelConfig) -> tuple[int, int]:
  """(total, non-embedding) parameter counts, exact, from the initialiser's shapes (no allocation)."""
  from recurrentgemma_tpu.model import api  # pylint: disable=g-import-not-at-top (api imports flax)
  shapes = jax.eval_shape(lambda: api.init_params(config, jax.random.key(0)))
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  total = count(shapes)
  return total, total - count(shapes["embedder"])
