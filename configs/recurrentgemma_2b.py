"""RecurrentGemma-2B (RecurrentGemma report, Table 1): 2.68B parameters, pretrained at 8192 tokens."""

from configs import base


def get_config():
  config = base.get_config()
  m = config.model
  m.vocab_size = 256_000
  m.width = 2560
  m.lru_width = 2560
  m.num_layers = 26  # 8 x (recurrent, recurrent, local attention) + (recurrent, recurrent)
  m.block_pattern = "griffin"
  m.num_heads = 10  # head_dim = 256; RG-LRU gate blocks = heads, like the published weights
  m.attention_window = 2048
  m.logits_soft_cap = 30.0
  m.embeddings_scale_by_sqrt_dim = True
  m.dtype = "bfloat16"
  m.remat = "block"
  config.data.seq_len = 8192
  return config
