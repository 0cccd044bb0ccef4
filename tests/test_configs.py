"""Presets: every config file builds, parameter counts match the papers, the summary CLI works."""

import importlib
import os
import subprocess
import sys

import pytest

from configs import ladder
from recurrentgemma_tpu.model import ModelConfig
from recurrentgemma_tpu.model.summary import summarize

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
PRESETS = sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                 if f.endswith(".py") and f not in ("__init__.py", "base.py", "ladder.py"))


def _model(name: str) -> ModelConfig:
  return ModelConfig.from_config(importlib.import_module(f"configs.{name}").get_config().model)


def test_every_ladder_point_has_a_preset_file():
  expected = {f"{fam}_{size}" for fam in ladder.FAMILIES for size in ladder.LADDER}
  assert expected <= set(PRESETS)
  assert {"tiny", "recurrentgemma_2b", "recurrentgemma_9b"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_a_valid_model_config(name):
  cfg = _model(name)
  assert cfg.num_layers >= 1 and cfg.lru_width_ % cfg.num_gate_blocks_ == 0


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
       f"--config={os.path.join(CONFIG_DIR, 'recurrentgemma_2b.py')}"],
      capture_output=True, text=True, timeout=300, check=True).stdout
  assert "total parameters:            2,682,862,080" in out
  assert "recurrent         x18" in out and "local_attention   x8" in out
  assert "FLOPs per token at seq_len 8192" in out
