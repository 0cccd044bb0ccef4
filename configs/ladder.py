"""The Griffin paper's scaling ladder (Table 2 / App. C) as complete training recipes.

    --config=configs/ladder.py:griffin,1b        # family in {griffin, hawk, mqa}, size in LADDER
    --config=configs/ladder.py:griffin,1b,hf     # the same run, exportable to Hugging Face exactly

`get_config("FAMILY,SIZE")` returns the full experiment of one ladder point: the architecture of
Table 2, sequence length 2048, the paper's Chinchilla-style token budget for the size turned into
`train.steps`, and batch, learning rate, weight decay and schedule from `configs/recipe.py`. The
points also go by name, `--config=griffin_1b` (or `configs/griffin_1b.py`) for every family and size,
resolved by `recurrentgemma_tpu/presets.py` without files of their own.

Settings the paper does not give follow the reference code, except the RG-LRU gate blocks: the
paper's 16 "for all experiments" (the reference ties them to heads, which cannot express 14B: D_RNN
8192 is not divisible by 40 heads' worth of blocks of a whole size).

The `hf` variant (`make_exportable`) keeps the size and the recipe and makes the choices
transformers' RecurrentGemma can express exactly: RecurrentGemma's logit soft-cap (30) and
embedding scale, gate blocks a multiple of the heads (16 where the heads divide 16, else the heads),
and D_RNN the nearest width those blocks divide (100m: 1026, 400m: 2052, 3b: 4104, 14b: 8200; the
others keep theirs). The paper's points themselves do not export: HF always soft-caps the logits.
"""

import math

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


VARIANTS = ("hf",)  # optional third part of the argument


def parse_arg(arg: str) -> tuple[str, str, str]:
  """'griffin,1b' -> ('griffin', '1b', ''); 'griffin,1b,hf' -> (..., 'hf'); names valid values."""
  parts = [p.strip() for p in (arg or "").split(",")]
  if len(parts) not in (2, 3):
    raise ValueError(f"configs/ladder.py:{arg} must be FAMILY,SIZE[,hf], e.g. "
                     f"configs/ladder.py:griffin,1b (families {FAMILIES}, sizes {tuple(LADDER)})")
  family, size, variant = (parts + [""])[:3]
  if family not in FAMILIES:
    raise ValueError(f"family={family!r} must be one of {FAMILIES}")
  if size not in LADDER:
    raise ValueError(f"size={size!r} must be one of {tuple(LADDER)}")
  if len(parts) == 3 and variant not in VARIANTS:
    raise ValueError(f"variant={variant!r} must be one of {VARIANTS} (or left out)")
  return family, size, variant


def make_exportable(m: ml_collections.ConfigDict) -> None:
  """Turns a model group into its closest Hugging Face-expressible form, in place (see above)."""
  m.logits_soft_cap = 30.0  # RecurrentGemma's; HF always applies a cap
  m.embeddings_scale_by_sqrt_dim = True  # HF always scales; tied tables then export as they are
  heads = m.num_heads
  blocks = 16 if 16 % heads == 0 else heads
  m.num_gate_blocks = blocks
  lru = m.lru_width or m.width
  step = math.lcm(2, heads, blocks)
  m.lru_width = max(step, int(round(lru / step)) * step)


def get_config(arg: str = "griffin,1b") -> ml_collections.ConfigDict:
  """The full experiment config of one ladder point, `arg` = "FAMILY,SIZE[,hf]"."""
  family, size, variant = parse_arg(arg)
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
  if variant == "hf":
    make_exportable(m)
  config.data.seq_len = SEQ_LEN
  recipe.apply(config, num_params=NOMINAL_PARAMS[size], tokens=TOKENS[size])
  return config
