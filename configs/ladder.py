"""The Griffin paper's scaling ladder (Table 2 / App. C) as complete training recipes.

    --config=configs/ladder.py:griffin,1b        # family in {griffin, hawk, mqa}, size in LADDER

`get_config("FAMILY,SIZE")` returns the full experiment of one ladder point: the architecture of
Table 2, sequence length 2048, the paper's Chinchilla-style token budget for the size turned into
`train.steps`, and batch, learning rate, weight decay and schedule from `configs/recipe.py`. The
points also go by name, `--config=griffin_1b` (or `configs/griffin_1b.py`) for every family and size,
resolved by `recurrentgemma_tpu/presets.py` without files of their own.

Settings the paper does not give follow the reference code, except the RG-LRU gate blocks: the
paper's 16 "for all experiments" (the reference ties them to heads, which cannot express 14B: D_RNN
8192 is not divisible by 40 heads' worth of blocks of a whole size).
"""

import ml_collections

from configs import base
from configs import recipe

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
# Nominal parameters of each size (the paper's names; "1b" is its 1.3B), which the recipe's
# learning-rate and batch rules are read at.
NOMINAL_PARAMS = {"100m": 100e6, "200m": 200e6, "400m": 400e6, "1b": 1.3e9, "3b": 3e9, "7b": 7e9,
                  "14b": 14e9}
# Training tokens per size ([G] Table 2, "Chinchilla-style"), the same for the three families.
TOKENS = {"100m": 1.9e9, "200m": 3.9e9, "400m": 7.8e9, "1b": 25e9, "3b": 60e9, "7b": 132.5e9,
          "14b": 300e9}
FAMILIES = ("griffin", "hawk", "mqa")
# MassiveText's tokenizer (Gopher / Chinchilla) has 32k entries; the Griffin paper does not
# restate it. Counts in docs/model.md are with this vocabulary.
LADDER_VOCAB = 32_000
SEQ_LEN = 2048  # [G] section 3


def parse_arg(arg: str) -> tuple[str, str]:
  """'griffin,1b' -> ('griffin', '1b'), naming the valid values on a bad one."""
  parts = [p.strip() for p in (arg or "").split(",")]
  if len(parts) != 2:
    raise ValueError(f"configs/ladder.py:{arg} must be FAMILY,SIZE, e.g. configs/ladder.py:griffin,1b "
                     f"(families {FAMILIES}, sizes {tuple(LADDER)})")
  family, size = parts
  if family not in FAMILIES:
    raise ValueError(f"family={family!r} must be one of {FAMILIES}")
  if size not in LADDER:
    raise ValueError(f"size={size!r} must be one of {tuple(LADDER)}")
  return family, size


def get_config(arg: str = "griffin,1b") -> ml_collections.ConfigDict:
  """The full experiment config of one ladder point, `arg` = "FAMILY,SIZE"."""
  family, size = parse_arg(arg)
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
  config.data.seq_len = SEQ_LEN
  recipe.apply(config, num_params=NOMINAL_PARAMS[size], tokens=TOKENS[size])
  return config
