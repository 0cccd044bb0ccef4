"""RecurrentGemma (RecurrentGemma report, Table 1) as training recipes: `--config=configs/recurrentgemma.py:2b`.

Both sizes are pretrained on 2T tokens of sequences of 8192 tokens; batch, learning rate, weight
decay and schedule come from `configs/recipe.py` like the ladder's. Its points also go by
name, `--config=recurrentgemma_2b` and `recurrentgemma_9b` (`recurrentgemma_tpu/presets.py`).
"""

import ml_collections

from configs import base
from configs import recipe

# size: (width, num_layers, num_heads, parameters per the report's Table 1).
# Layers: n x (recurrent, recurrent, local attention) + (recurrent, recurrent); head_dim = 256;
# RG-LRU gate blocks = heads, like the published weights.
SIZES = {
    "2b": (2560, 26, 10, 2.68e9),
    "9b": (4096, 38, 16, 8.58e9),
}
TOKENS = 2e12  # [RG] section 3: 2T tokens for both sizes
SEQ_LEN = 8192  # [RG]: pretrained on sequences of 8192 tokens


def get_config(size: str = "2b") -> ml_collections.ConfigDict:
  """The full experiment config of RecurrentGemma-`size` ("2b" or "9b")."""
  if size not in SIZES:
    raise ValueError(f"size={size!r} must be one of {tuple(SIZES)}")
  width, num_layers, num_heads, num_params = SIZES[size]
  config = base.get_config()
  m = config.model
  m.vocab_size = 256_000
  m.width = width
  m.lru_width = width
  m.num_layers = num_layers
  m.block_pattern = "griffin"
  m.num_heads = num_heads
  m.attention_window = 2048
  m.logits_soft_cap = 30.0
  m.embeddings_scale_by_sqrt_dim = True
  m.dtype = "bfloat16"
  m.remat = "block"
  config.data.seq_len = SEQ_LEN
  recipe.apply(config, num_params=num_params, tokens=TOKENS)
  return config
