"""The Griffin paper's scaling ladder (Table 2 / App. C), shared by the MQA, Hawk and Griffin families.

Each preset file (`configs/{griffin,hawk,mqa}_{100m,...,14b}.py`) is `ladder.get_config(family,
size)`. Settings the paper does not give follow the reference code, except the RG-LRU gate
blocks: the paper's 16 "for all experiments" (the reference ties them to heads, which cannot
express 14B: D_RNN 8192 is not divisible by 40 heads' worth of blocks of a whole size).
"""

import ml_collections

from configs import base

# size: (width D, D_RNN, depth, heads). Head dim is 128 throughout (H * 128 = D).
LADDER = {
    "100m": (768, 1024, 12, 6),
    "200m": (1024, 1536, 12, 8),
    "400m": (1536, 2048, 12, 12),
    "1b": (2048, 2560, 24, 16),
    "3b": (3072, 4096, 24, 24),
    "7b": (4096, 5632, 32, 32),
    "14b": (5120, 8192, 40, 40),
}
FAMILIES = ("griffin", "hawk", "mqa")
# MassiveText's tokenizer (Gopher / Chinchilla) has 32k entries; the Griffin paper does not
# restate it. Counts in docs/model.md are with this vocabulary.
LADDER_VOCAB = 32_000


def get_config(family: str, size: str) -> ml_collections.ConfigDict:
  """The full experiment config of one ladder point."""
  if family not in FAMILIES:
    raise ValueError(f"family={family!r} must be one of {FAMILIES}")
  if size not in LADDER:
    raise ValueError(f"size={size!r} must be one of {tuple(LADDER)}")
  width, lru_width, depth, heads = LADDER[size]
  config = base.get_config()
  m = config.model
  m.vocab_size = LADDER_VOCAB
  m.width = width
  m.lru_width = lru_width
  m.num_layers = depth
  m.num_heads = heads
  m.head_dim = 128
  m.num_gate_blocks = 16
  m.block_pattern = family
  m.attention_window = 1024  # [G] section 3: window 1024 when training at 2048
  m.logits_soft_cap = 0.0
  m.embeddings_scale_by_sqrt_dim = False
  m.dtype = "bfloat16"  # [G] section 4: bfloat16 parameters-in-compute and activations
  m.remat = "block"
  m.scan_layers = True
  config.data.seq_len = 2048  # [G] section 3
  return config
