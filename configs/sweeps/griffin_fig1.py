"""The Griffin paper's Figure 1(a) ladder as published: MQA, Hawk and Griffin from 100M to 7B, plus
Griffin 14B, each trained on its Chinchilla-style token budget ([G] section 3, Table 2).

    python -m launch.sweep run --sweep=configs/sweeps/griffin_fig1.py --root=gs://BUCKET/sweeps/fig1 \
        --backend=tpu_vm --launch_flags="--zone=us-east5-a --project=P --capacity=spot"

Every trial is a point of configs/ladder.py ("FAMILY,SIZE"), which already carries the paper's
architecture, sequence length 2048 and token budget (1.9B tokens at 100M ... 300B at 14B) and the
project's learning-rate / batch recipe (configs/recipe.py); the sweep adds nothing to them, so a
trial here is exactly `--config=configs/ladder.py:FAMILY,SIZE`. 19 trials, about 1e18 to 2e22
training FLOPs (see `python -m launch.sweep status`). On a pod backend each trial runs on the smallest
of `targets` that its ahead-of-time compile fits (v5p slices of 4 to 128 chips; cached verdicts).
"""

import ml_collections

from launch.sweep.axes import chain, fixed, product, sweep

FAMILIES = ("mqa", "hawk", "griffin")
SIZES = ("100m", "200m", "400m", "1b", "3b", "7b")


def get_sweep():
  s = ml_collections.ConfigDict()
  s.name = "griffin_fig1"
  s.base = "configs/ladder.py:{family},{size}"
  s.axes = chain(product(sweep("family", FAMILIES), sweep("size", SIZES)),
                 fixed(family="griffin", size="14b"))
  s.tokens = {"rule": "config"}  # the ladder's train.steps already are the paper's token budgets
  s.budgets = ()
  s.targets = ("v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128", "v5p-256")
  s.metric = "eval/loss"
  s.retries = 2
  return s
