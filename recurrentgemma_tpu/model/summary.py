"""Parameter and FLOP accounting for a config, and its CLI.

  python -m recurrentgemma_tpu.model.summary --config=configs/recurrentgemma_2b.py [--seq_len=N]

Parameter counts come from `jax.eval_shape` of the real initialiser (exact, allocation-free);
FLOPs per token are counted analytically from the same shapes: 2 per multiply-add of every
weight matrix a token passes through, plus attention scores and values over the tokens it
actually attends to (bounded by the window), plus the tied output projection. Element-wise work
(norms, gates, the scan) is left out, as in the 6ND convention.
"""

import dataclasses
from typing import Any

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from recurrentgemma_tpu.model.api import init_params
from recurrentgemma_tpu.model.config import GLOBAL_ATTENTION, RECURRENT, ModelConfig


@dataclasses.dataclass(frozen=True)
class Summary:
  total: int
  embedding: int
  non_embedding: int
  per_block_type: dict[str, int]  # parameters of all blocks of each type (incl. their MLPs)
  blocks_per_type: dict[str, int]
  forward_flops_per_token: float
  train_flops_per_token: float  # 3 x forward (backward = 2 x forward)
  seq_len: int


def _count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _mean_context(block_type: str, window: int, seq_len: int) -> float:
  """Average number of keys a query attends to over a row of seq_len tokens."""
  t = np.arange(seq_len)
  if block_type == GLOBAL_ATTENTION:
    return float(np.mean(t + 1))
  return float(np.mean(np.minimum(t, window) + 1))


def summarize(config: ModelConfig, seq_len: int) -> Summary:
  """Counts parameters per block type and FLOPs per token at sequence length seq_len."""
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  embedding = _count(shapes["embedder"])
  per_type = {t: 0 for t in sorted(set(config.block_types))}
  for i, t in enumerate(config.block_pattern):
    if "groups" in shapes:
      per_type[t] += _count(shapes["groups"][f"block_{i}"])
  for i, t in enumerate(config.remainder_types):
    per_type[t] += _count(shapes["remainder"][f"block_{i}"])
  total = _count(shapes)
  counts = {t: config.block_types.count(t) for t in per_type}

  D, R, F = config.width, config.lru_width_, config.mlp_width
  H, K, N = config.num_heads, config.head_dim_, config.num_gate_blocks_
  mlp = 3 * D * F  # up (two branches) and down
  flops = 0.0
  for t in config.block_types:
    if t == RECURRENT:
      matmul = 3 * D * R + 2 * R * R // N  # linear_x, linear_y, linear_out; both gates
    else:
      matmul = 2 * D * H * K + 2 * D * K  # q, out; k, v
      flops += 2 * 2 * H * K * _mean_context(t, config.attention_window, seq_len)
    flops += 2 * (matmul + mlp)
  flops += 2 * config.vocab_size * D  # tied unembedding
  return Summary(total=total, embedding=embedding, non_embedding=total - embedding,
                 per_block_type=per_type, blocks_per_type=counts, forward_flops_per_token=flops,
                 train_flops_per_token=3 * flops, seq_len=seq_len)


def format_summary(config: ModelConfig, s: Summary) -> str:
  lines = [
      f"model: {config.num_layers} blocks, pattern {','.join(config.block_pattern)}, "
      f"width {config.width}, lru_width {config.lru_width_}, heads {config.num_heads} x "
      f"{config.head_dim_}, gate blocks {config.num_gate_blocks_}, vocab {config.vocab_size}",
      f"total parameters:         {s.total:>16,d}  ({s.total / 1e9:.3f}B)",
      f"embedding parameters:     {s.embedding:>16,d}  ({s.embedding / 1e9:.3f}B)",
      f"non-embedding parameters: {s.non_embedding:>16,d}  ({s.non_embedding / 1e9:.3f}B)",
  ]
  for t, n in s.per_block_type.items():
    lines.append(f"  {t:<17s} x{s.blocks_per_type[t]:<3d}      {n:>16,d}  "
                 f"({n / max(s.blocks_per_type[t], 1):,.0f} per block, MLP and norms included)")
  lines += [
      f"FLOPs per token at seq_len {s.seq_len}: forward {s.forward_flops_per_token:.4g}, "
      f"train (3x) {s.train_flops_per_token:.4g}  (6N would be {6 * s.total:.4g})",
  ]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  experiment = flags.FLAGS.config
  if experiment is None:
    raise app.UsageError("--config=configs/NAME.py is required")
  config = ModelConfig.from_config(experiment.model)
  seq_len = flags.FLAGS.seq_len or int(experiment.data.seq_len)
  print(format_summary(config, summarize(config, seq_len)))


def run() -> None:
  # Flags are defined here, not at import, so importing this module never clashes with the
  # flags of another CLI (e.g. train.py's --config) in the same process.
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_integer("seq_len", 0, "Sequence length for FLOPs; 0: config.data.seq_len.")
  app.run(main)


if __name__ == "__main__":
  run()
