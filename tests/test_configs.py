"""Presets: every config file builds an Experiment, runs carry the papers' token budgets, parameter
counts match the papers, the summary CLI works."""

import subprocess
import sys

import pytest

from configs import ladder
from configs import recipe
from recurrentgemma_tpu import experiment as experiment_lib
from recurrentgemma_tpu import presets
from recurrentgemma_tpu.model import ModelConfig
from recurrentgemma_tpu.model.summary import summarize

# Every name `--config` accepts (files of configs/ and the ladder's and RecurrentGemma's named points).
PRESETS = presets.names()

# Training tokens by size: the Griffin paper's Table 2 ("Chinchilla-style", all three families) and
# the RecurrentGemma report (2T tokens for both sizes).
PAPER_TOKENS = {"100m": 1.9e9, "200m": 3.9e9, "400m": 7.8e9, "1b": 25e9, "3b": 60e9, "7b": 132.5e9,
                "14b": 300e9}
RECURRENTGEMMA_TOKENS = 2e12


def _experiment(name: str, num_devices: int | None = None) -> experiment_lib.Experiment:
  config = experiment_lib.load_config(name)
  return experiment_lib.build(config, num_devices or experiment_lib.min_devices(config))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_an_experiment(name):
  exp = _experiment(name)
  assert exp.train.steps >= 1 and exp.total_tokens == exp.tokens_per_step * exp.train.steps
  cfg = exp.model
  assert cfg.num_layers >= 1 and cfg.lru_width_ % cfg.num_gate_blocks_ == 0


def _paper_budget(name: str) -> float | None:
  if name.startswith("recurrentgemma"):
    return RECURRENTGEMMA_TOKENS
  family, _, size = name.partition("_")
  return PAPER_TOKENS[size] if family in ladder.FAMILIES else None


@pytest.mark.parametrize("name", [p for p in PRESETS if _paper_budget(p) is not None])
def test_presets_are_recipes_with_the_papers_token_budgets(name):
  # 128 devices (v5p:4x4x8): the batch must divide over the ZeRO shards of the README's compile.
  exp = _experiment(name, num_devices=128)
  budget = _paper_budget(name)
  assert abs(exp.total_tokens - budget) <= exp.tokens_per_step / 2, (exp.total_tokens, budget)
  assert exp.data.seq_len == (8192 if name.startswith("recurrentgemma") else 2048)
  o = exp.optimizer
  # Warm-up, then cosine decay over the whole run; rate and decay from the one rule by size.
  assert 1 <= o.warmup_steps <= 0.1 * exp.train.steps
  assert o.decay_steps == exp.train.steps and o.final_lr_ratio == 0.1
  assert o.weight_decay == recipe.WEIGHT_DECAY
  assert 1e-4 <= o.learning_rate <= 6e-4


def test_learning_rate_and_batch_shrink_and_grow_with_size():
  exps = [_experiment(f"griffin_{size}") for size in ladder.LADDER]
  rates = [e.optimizer.learning_rate for e in exps]
  batches = [e.data.global_batch_size for e in exps]
  assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1]
  assert batches == sorted(batches) and batches[0] < batches[-1]
  # GPT-3 Table 2.1 rows are reproduced at their own sizes.
  for n, lr, tokens in recipe.GPT3_TABLE:
    assert recipe.learning_rate(n) == pytest.approx(lr)
    assert recipe.batch_tokens(n) == tokens


@pytest.mark.parametrize("family", ladder.FAMILIES)
def test_any_ladder_point_by_argument_equals_its_named_preset(family):
  by_arg = experiment_lib.build(experiment_lib.load_config(f"ladder:{family},400m"), 1).fingerprint()
  # The names users type for a ladder point (no file of their own) load that point.
  for spec in (f"{family}_400m", f"configs/{family}_400m.py", f"{family}_400m.py"):
    assert experiment_lib.build(experiment_lib.load_config(spec), 1).fingerprint() == by_arg, spec


@pytest.mark.parametrize("arg, match", [("griffin", "FAMILY,SIZE"), ("gryffin,1b", "family='gryffin'"),
                                        ("hawk,2b", "size='2b'")])
def test_bad_ladder_argument_names_the_valid_values(arg, match):
  with pytest.raises(ValueError, match=match):
    ladder.get_config(arg)


def _model(name: str) -> ModelConfig:
  return _experiment(name).model


def test_every_ladder_point_is_a_preset():
  expected = {f"{fam}_{size}" for fam in ladder.FAMILIES for size in ladder.LADDER}
  assert expected <= set(PRESETS)
  assert {"tiny", "recurrentgemma_2b", "recurrentgemma_9b"} <= set(PRESETS)


def _closed_form_params(cfg: ModelConfig) -> int:
  """Parameter count written out from the architecture, independent of the initialiser."""
  D, F, R, W = cfg.width, cfg.mlp_width, cfg.lru_width_, cfg.conv_width
  H, K, N = cfg.num_heads, cfg.head_dim_, cfg.num_gate_blocks_
  common = 2 * D + (2 * D * F + 2 * F) + (F * D + D)  # two norms, MLP
  recurrent = (2 * (D * R + R) + (R * D + D) + (W * R + R) + R
               + 2 * (N * (R // N) ** 2 + R))  # linear_x/y, out, conv, Lambda, two gates
  attention = D * H * K + 2 * D * K + H * K * D + D
  total = cfg.vocab_size * D + D
  for t in cfg.block_types:
    total += common + (recurrent if t == "recurrent" else attention)
  return total


@pytest.mark.parametrize("name,total,embedding,non_embedding", [
    ("recurrentgemma_2b", 2.68e9, 0.65e9, 2.03e9),  # RecurrentGemma report, Table 1
    ("recurrentgemma_9b", 8.58e9, 1.05e9, 7.53e9),
])
def test_recurrentgemma_parameter_counts_match_the_report(name, total, embedding, non_embedding):
  cfg = _model(name)
  s = summarize(cfg, seq_len=8192)
  assert s.total == _closed_form_params(cfg)
  assert abs(s.total / total - 1) < 0.01
  assert abs(s.embedding / embedding - 1) < 0.01
  assert abs(s.non_embedding / non_embedding - 1) < 0.01
  assert sum(s.per_block_type.values()) + cfg.width == s.non_embedding  # + final norm


@pytest.mark.parametrize("size,nominal", [("200m", 200e6), ("400m", 400e6), ("1b", 1.3e9),
                                          ("3b", 3e9), ("7b", 7e9), ("14b", 14e9)])
def test_griffin_ladder_is_close_to_nominal_sizes(size, nominal):
  cfg = _model(f"griffin_{size}")
  s = summarize(cfg, seq_len=2048)
  assert s.total == _closed_form_params(cfg)
  assert abs(s.total / nominal - 1) < 0.05, s.total


def test_ladder_families_share_the_table_and_differ_in_blocks():
  g, h, m = (_model(f"{fam}_7b") for fam in ladder.FAMILIES)
  assert (g.width, g.lru_width_, g.num_layers, g.num_heads) == (4096, 5632, 32, 32)
  assert (g.width, g.num_layers) == (h.width, h.num_layers) == (m.width, m.num_layers)
  assert set(h.block_types) == {"recurrent"} and set(m.block_types) == {"global_attention"}
  assert g.num_gate_blocks_ == 16 and g.head_dim_ == 128


def test_forward_flops_count_every_weight_once_for_hawk():
  # Hawk has no attention, so forward FLOPs = 2 x (matmul weights) + the tied unembedding.
  cfg = _model("hawk_100m")
  s = summarize(cfg, seq_len=2048)
  D, R, F, W = cfg.width, cfg.lru_width_, cfg.mlp_width, cfg.conv_width
  non_matmul = cfg.num_layers * (2 * D + 2 * F + D + 2 * R + D + (W * R + R) + R + 2 * R) + D
  assert s.forward_flops_per_token == 2 * (s.non_embedding - non_matmul) + 2 * s.embedding


def test_summary_cli_prints_counts():
  out = subprocess.run(
      [sys.executable, "-m", "recurrentgemma_tpu.model.summary",
       "--config=recurrentgemma_2b"],
      capture_output=True, text=True, timeout=300, check=True).stdout
  assert "total parameters:            2,682,862,080" in out
  assert "recurrent         x18" in out and "local_attention   x8" in out
  assert "FLOPs per token at seq_len 8192" in out
