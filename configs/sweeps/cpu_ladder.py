"""The Griffin paper's three families (MQA, Hawk, Griffin) at four sizes that train on 2 CPU cores.

    python -m launch.sweep run --sweep=configs/sweeps/cpu_ladder.py --root=workdirs/cpu_ladder_v2 \
        --backend=local --parallel=2

Shrunk from configs/tiny.py (rows of 256 tokens, batch 8, the embedded corpus) with a 1024-entry
vocabulary so the output layer does not dominate the compute of the smallest models. Widths 32-96,
one (recurrent, recurrent, local attention) group of 3 blocks, D_RNN ~ 4D/3 and 16 gate blocks as
in the paper's ladder, head dim width / heads. Tokens are proportional to parameters like the paper's
ladder, but at 2 tokens per parameter instead of Chinchilla's ~20 (72 to 460 steps), so these
models are far from compute-optimal (see docs/scaling.md).

Budget: measured on an idle 2-core host, a trial costs ~38 CPU-s of fixed work (two interpreters,
compiling the train and eval steps, the final evaluation, checkpoints) plus ~0.22 (w32) to ~0.5
(w96) CPU-s per step, so the 12 trials cost ~26 CPU-minutes; a real run (docs/scaling.md) measured
~25.7 CPU-minutes with one kill and resume, inside the ~40 CPU-minute budget.
"""

import ml_collections

from launch.sweep.axes import product, sweep

# size: (width D, D_RNN, heads); 3 blocks each.
SIZES = {
    "w32": (32, 48, 1),
    "w48": (48, 64, 1),
    "w64": (64, 80, 2),
    "w96": (96, 128, 3),
}
FAMILIES = ("mqa", "hawk", "griffin")


def get_sweep():
  s = ml_collections.ConfigDict()
  s.name = "cpu_ladder"
  s.base = "configs/tiny.py"
  s.overrides = {
      "model": {"vocab_size": 1024, "num_layers": 3, "num_gate_blocks": 16},
      "data": {"num_eval_batches": 8},
      "optimizer": {"learning_rate": 3e-3},
      "train": {"eval_every": 0, "log_every": 10},
      "checkpoint": {"save_every": 100, "keep_last": 1},
  }
  s.choices = {
      "family": {f: {"model": {"block_pattern": f}} for f in FAMILIES},
      "size": {name: {"model": {"width": d, "lru_width": r, "num_heads": h}}
               for name, (d, r, h) in SIZES.items()},
  }
  s.axes = product(sweep("family", FAMILIES), sweep("size", SIZES))
  s.tokens = {"rule": "params", "per_param": 2.0, "params": "total"}
  s.budgets = ()
  s.schedule = {"decay_with_steps": True, "warmup_fraction": 0.1}
  s.lr = {"rule": "config"}
  s.metric = "eval/loss"
  s.retries = 2
  return s
