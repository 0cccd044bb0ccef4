"""The training recipe of the presets: batch, learning rate, weight decay and schedule by model size.

The one place these rules live (docs/model.md, "Training recipes", gives the sources). The Griffin paper
fixes the sequence length (2048) and the token budget of each size (Table 2, Chinchilla-style), but
publishes no batch size, learning rate or schedule. Those follow:

* batch size and peak learning rate: GPT-3 (Brown et al. 2020, Table 2.1), whose model sizes span the
  same range (125M-13B). The learning rate is interpolated log-linearly in the parameter count
  between its rows (and held at the end rows outside them); the batch, in tokens, is the one of the
  largest row not above the model, rounded to whole sequences;
* weight decay 0.1 at every size (GPT-3, App. B);
* linear warm-up over GPT-3's 375M tokens, but at most 10% of the run; then cosine decay to 10% of
  the peak over the whole run (Chinchilla, Hoffmann et al. 2022: the cosine cycle should match the
  number of training steps, decaying the rate 10x).
"""

import math

import ml_collections

# GPT-3 Table 2.1: (parameters, peak learning rate, batch size in tokens). Its "0.5M / 1M / 2M"
# tokens are 256 / 512 / 1024 sequences of its 2048-token context.
GPT3_TABLE = (
    (125e6, 6.0e-4, 2**19),
    (350e6, 3.0e-4, 2**19),
    (760e6, 2.5e-4, 2**19),
    (1.3e9, 2.0e-4, 2**20),
    (2.7e9, 1.6e-4, 2**20),
    (6.7e9, 1.2e-4, 2**21),
    (13e9, 1.0e-4, 2**21),
)
WEIGHT_DECAY = 0.1
WARMUP_TOKENS = 375e6
MAX_WARMUP_FRACTION = 0.1
FINAL_LR_RATIO = 0.1


def learning_rate(num_params: float) -> float:
  """Peak learning rate: GPT-3's, log-linear in the parameter count between its rows."""
  rows = [(math.log(n), math.log(lr)) for n, lr, _ in GPT3_TABLE]
  x = math.log(num_params)
  if x <= rows[0][0]:
    return GPT3_TABLE[0][1]
  if x >= rows[-1][0]:
    return GPT3_TABLE[-1][1]
  for (x0, y0), (x1, y1) in zip(rows, rows[1:]):
    if x0 <= x <= x1:
      return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
  raise AssertionError("unreachable")


def batch_tokens(num_params: float) -> float:
  """Tokens per step: GPT-3's batch of the largest row not above the model (the first row below)."""
  below = [b for n, _, b in GPT3_TABLE if n <= num_params]
  return below[-1] if below else GPT3_TABLE[0][2]


def apply(config: ml_collections.ConfigDict, *, num_params: float, tokens: float) -> None:
  """Sets batch, steps, schedule, learning rate and weight decay of `config` for a model of
  `num_params` parameters trained on `tokens` tokens at `config.data.seq_len`."""
  seq_len = config.data.seq_len
  batch = max(round(batch_tokens(num_params) / seq_len), 1)
  tokens_per_step = batch * seq_len
  steps = max(round(tokens / tokens_per_step), 1)
  warmup = max(min(round(WARMUP_TOKENS / tokens_per_step), int(MAX_WARMUP_FRACTION * steps)), 1)
  config.data.global_batch_size = batch
  config.data.eval_batch_size = batch
  config.train.steps = steps
  o = config.optimizer
  o.learning_rate = learning_rate(num_params)
  o.weight_decay = WEIGHT_DECAY
  o.warmup_steps = warmup
  o.decay_steps = 0  # cosine over the whole run: follows train.steps, also when overridden
  o.final_lr_ratio = FINAL_LR_RATIO
