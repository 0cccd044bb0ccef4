"""Tiny Griffin that trains on a 2-core CPU in a few minutes: the README's main job.

Two (recurrent, recurrent, local attention) groups of width 128 with a 4096-token vocabulary
(~1.8M parameters). The window (128) is shorter than the rows (256) so local attention really
is local.
"""

from configs import base


def get_config():
  config = base.get_config()
  m = config.model
  m.vocab_size = 4096  # the data pipeline trains its SentencePiece model at this size
  m.width = 128
  m.num_layers = 6
  m.block_pattern = "griffin"
  m.num_heads = 2  # head_dim 64
  m.lru_width = 128
  m.attention_window = 128
  m.dtype = "float32"  # bfloat16 is emulated (slow) on CPUs
  m.remat = "none"
  m.scan_layers = True

  config.data.seq_len = 256
  config.data.global_batch_size = 8
  config.data.eval_batch_size = 8
  config.data.num_eval_batches = 4

  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 50
  config.optimizer.weight_decay = 0.01

  config.train.steps = 600  # 1.2M tokens; ~4 minutes on an idle 2-core CPU
  config.train.log_every = 25
  config.train.eval_every = 200

  config.checkpoint.save_every = 200
  return config
