"""Parameter and FLOP accounting for an experiment, and its CLI.

  python -m recurrentgemma_tpu.model.summary --config=recurrentgemma_2b [--seq_len=N]

Parameter counts come from `jax.eval_shape` of the real initialiser (exact, allocation-free); FLOPs
per token from the one FLOP model, `model/flops.py` (the one the training MFU and the compile
report use).
"""

import dataclasses
from typing import Any

from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from recurrentgemma_tpu.checkpoints import hf_mapping
from recurrentgemma_tpu.model import flops as flops_lib
from recurrentgemma_tpu.model.api import init_params
from recurrentgemma_tpu.model.config import ModelConfig


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


def summarize(config: ModelConfig, seq_len: int) -> Summary:
  """Counts parameters per block type and FLOPs per token at sequence length seq_len."""
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  per_type = {t: 0 for t in sorted(set(config.block_types))}
  for i, t in enumerate(config.block_pattern):
    if "groups" in shapes:
      per_type[t] += _count(shapes["groups"][f"block_{i}"])
  for i, t in enumerate(config.remainder_types):
    per_type[t] += _count(shapes["remainder"][f"block_{i}"])
  total, non_embedding = flops_lib.param_counts(config)
  counts = {t: config.block_types.count(t) for t in per_type}
  forward = flops_lib.forward_flops_per_token(config, seq_len).total
  return Summary(total=total, embedding=total - non_embedding, non_embedding=non_embedding,
                 per_block_type=per_type, blocks_per_type=counts, forward_flops_per_token=forward,
                 train_flops_per_token=flops_lib.training_flops_per_token(config, seq_len),
                 seq_len=seq_len)


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
  # Whether a run of this model can be published to transformers (float32 export), and why not.
  lines += hf_mapping.expressibility(config).lines()
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv  # cli.run refuses positional arguments
  # Imported here: experiment imports the data and training modules, which this module must not
  # need when imported as a library.
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  config = cli.load_config_flag(flags.FLAGS["config"])
  exp = experiment_lib.build(config, num_devices=experiment_lib.min_devices(config))
  seq_len = flags.FLAGS.seq_len or exp.data.seq_len
  print(format_summary(exp.model, summarize(exp.model, seq_len)))
  print(f"training run: {exp.data.global_batch_size} x {exp.data.seq_len} tokens/step x "
        f"{exp.train.steps} steps = {exp.total_tokens / 1e9:.4g}B tokens, "
        f"{flops_lib.training_flops_per_token(exp.model, exp.data.seq_len) * exp.total_tokens:.4g} "
        "model FLOPs")


def run() -> None:
  # Flags are defined here, not at import, so importing this module never clashes with the
  # flags of another CLI (e.g. train.py's --config) in the same process.
  config_flags.DEFINE_config_file("config", None, "Experiment config: configs/NAME.py[:ARG] or a "
                                  "preset's NAME.", lock_config=True)
  flags.DEFINE_integer("seq_len", 0, "Sequence length for FLOPs; 0: config.data.seq_len.")
  flags.mark_flags_as_required(["config"])
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, __doc__)


if __name__ == "__main__":
  run()
