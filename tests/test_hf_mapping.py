"""The Hugging Face mapping without torch: expressibility of the presets, layouts, config checks, and
the export command's one-line refusals of bad requests. Parity with transformers itself is in
tests/test_hf_bridge.py (slow tier)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import ladder
from configs import recurrentgemma
from recurrentgemma_tpu import model as model_lib
from recurrentgemma_tpu.checkpoints import hf_mapping
from recurrentgemma_tpu.checkpoints import manager as ckpt
from test_train_common import REPO, small_config, subprocess_env


def _model(config):
  return model_lib.ModelConfig.from_config(config.model)


# What the transformers source fixes (read by hand, independent of the code under test): the
# soft-cap is always applied, head_dim = width // heads, lru_width % heads == 0, gate blocks = heads
# (ours must be a multiple to densify). Ladder: head_dim 128 = width / heads everywhere.
_LADDER_FINDINGS = {
    "100m": {"logits_soft_cap", "lru_width"},  # 1024 % 6
    "200m": {"logits_soft_cap"},
    "400m": {"logits_soft_cap", "lru_width"},  # 2048 % 12
    "1b": {"logits_soft_cap"},
    "3b": {"logits_soft_cap", "lru_width"},  # 4096 % 24
    "7b": {"logits_soft_cap", "num_gate_blocks"},  # 32 heads do not divide 16 blocks
    "14b": {"logits_soft_cap", "lru_width"},  # 8192 % 40
}


@pytest.mark.parametrize("size", list(ladder.LADDER))
def test_ladder_points_are_refused_for_the_right_fields_and_their_hf_variant_exports(size):
  cfg = _model(ladder.get_config(f"griffin,{size}"))
  assert {f.field for f in hf_mapping.expressibility(cfg).findings} == _LADDER_FINDINGS[size]
  for family in ladder.FAMILIES:
    plain, variant = ladder.get_config(f"{family},{size}"), ladder.get_config(f"{family},{size},hf")
    report = hf_mapping.expressibility(_model(variant), "bfloat16")
    assert report.exportable, report.lines()
    # Same size and recipe: only the model's HF-relevant choices differ.
    for group in ("optimizer", "train", "data", "mesh", "checkpoint"):
      assert plain[group].to_dict() == variant[group].to_dict()
    changed = {k for k in plain.model if plain.model[k] != variant.model[k]}
    assert changed <= {"logits_soft_cap", "embeddings_scale_by_sqrt_dim", "num_gate_blocks",
                       "lru_width"}
    assert abs(variant.model.lru_width - plain.model.lru_width) <= 0.01 * plain.model.lru_width


def test_hf_variant_widths_are_the_documented_ones():
  widths = {s: ladder.get_config(f"griffin,{s},hf").model.lru_width for s in ladder.LADDER}
  assert widths == {"100m": 1026, "200m": 1536, "400m": 2052, "1b": 2560, "3b": 4104,
                    "7b": 5632, "14b": 8200}


@pytest.mark.parametrize("size", ["2b", "9b"])
def test_recurrentgemma_presets_export_natively(size):
  cfg = _model(recurrentgemma.get_config(size))
  report = hf_mapping.expressibility(cfg, "bfloat16")
  assert report.exportable
  assert report.rewrites == (f"attention_window_size = window + 1 = 2049 (HF keeps W keys, this "
                             "model window + 1)",)
  fields = hf_mapping.hf_config(cfg, pad_id=0, eos_id=1, bos_id=2, dtype="bfloat16")
  # The published 2B's values per transformers' conversion script: intermediate 15360 for 2560.
  width = cfg.width
  assert fields["intermediate_size"] == 6 * width and fields["num_key_value_heads"] == 1
  assert fields["block_types"] == ["recurrent", "recurrent", "attention"]
  assert fields["tie_word_embeddings"] and fields["attention_window_size"] == 2049
  hf_mapping.check_hf_config(fields, cfg)  # and it reads back as the same model


def test_mixed_local_and_global_attention_and_unscaled_bfloat16_are_refused():
  cfg = _model(small_config(model__block_pattern="recurrent,local_attention,global_attention",
                            model__logits_soft_cap=30.0))
  report = hf_mapping.expressibility(cfg, "bfloat16")
  assert {f.field for f in report.findings} == {"block_pattern", "embeddings_scale_by_sqrt_dim"}
  assert "embeddings_scale_by_sqrt_dim=False" in report.one_line()
  with pytest.raises(hf_mapping.NotExpressible, match="block_pattern"):
    hf_mapping.to_hf({}, cfg)


def _params(cfg, seed=0):
  return jax.tree.map(np.asarray, model_lib.init_params(cfg, jax.random.key(seed)))


def test_layout_of_the_tensors_follows_transformers_modules():
  cfg = _model(small_config(model__num_heads=2, model__num_gate_blocks=4, model__lru_width=96,
                            model__num_layers=4, model__logits_soft_cap=30.0,
                            model__embeddings_scale_by_sqrt_dim=True))
  params = _params(cfg)
  sd = hf_mapping.to_hf(params, cfg)
  D, R, W, F = cfg.width, cfg.lru_width_, cfg.conv_width, cfg.mlp_width
  # Layer 3 is the remainder's first block (pattern R, R, A; 4 layers = one group + R).
  rec = params["remainder"]["block_0"]["recurrent_block"]
  t = "model.layers.3.temporal_block."
  assert sd[t + "conv_1d.weight"].shape == (R, 1, W)
  # torch's Conv1d correlates: its tap W - 1 multiplies the current token, like our w[W - 1].
  np.testing.assert_array_equal(sd[t + "conv_1d.weight"][:, 0, W - 1], rec["conv_1d"]["w"][W - 1])
  np.testing.assert_array_equal(sd[t + "linear_x.weight"], rec["linear_x_w"].T)
  # Gates: 4 blocks of 24 regrouped into 2 HF blocks of 48, zero between the original blocks.
  w = sd[t + "rg_lru.input_gate_weight"]
  assert w.shape == (2, 48, 48)
  np.testing.assert_array_equal(w[1, :24, :24], rec["rg_lru"]["input_gate"]["w"][2])
  assert not w[1, :24, 24:].any() and not w[0, 24:, :24].any()
  mlp = params["groups"]["block_2"]["mlp_block"]
  l2 = "model.layers.2.mlp_block."
  np.testing.assert_array_equal(sd[l2 + "gate_proj.weight"], mlp["ffw_up_w"][0, 0].T)  # group 0
  np.testing.assert_array_equal(sd[l2 + "up_proj.bias"], mlp["ffw_up_b"][0, 1])
  assert sd[l2 + "down_proj.weight"].shape == (D, F)
  att = params["groups"]["block_2"]["attention_block"]
  q = sd["model.layers.2.temporal_block.q_proj.weight"]
  assert q.shape == (cfg.num_heads * cfg.head_dim_, D)
  np.testing.assert_array_equal(q[cfg.head_dim_:2 * cfg.head_dim_], att["q_w"][0, :, 1, :].T)
  assert "lm_head.weight" not in sd  # tied
  back = hf_mapping.from_hf(sd, cfg)
  jax.tree.map(np.testing.assert_array_equal, params, back)


def test_unscaled_model_exports_untied_tables_and_imports_back_bitwise():
  cfg = _model(small_config(model__logits_soft_cap=30.0, model__block_pattern="hawk",
                            model__num_layers=2))
  params = _params(cfg)
  sd = hf_mapping.to_hf(params, cfg)
  table = params["embedder"]["input_embedding"]
  np.testing.assert_array_equal(sd["lm_head.weight"], table)
  scale = float(np.sqrt(np.float32(cfg.width)))
  np.testing.assert_allclose(sd["model.embed_tokens.weight"] * scale, table, rtol=2e-3)
  jax.tree.map(np.testing.assert_array_equal, params, hf_mapping.from_hf(sd, cfg))


def test_gate_weights_that_are_not_block_diagonal_are_refused():
  cfg = _model(small_config(model__num_heads=2, model__num_gate_blocks=4, model__lru_width=96,
                            model__logits_soft_cap=30.0, model__embeddings_scale_by_sqrt_dim=True))
  sd = hf_mapping.to_hf(_params(cfg), cfg)
  sd["model.layers.0.temporal_block.rg_lru.recurrent_gate_weight"][0, 0, 30] = 1.0
  with pytest.raises(hf_mapping.NotExpressible, match="outside 4 diagonal blocks"):
    hf_mapping.from_hf(sd, cfg)


def test_hf_config_of_another_architecture_or_size_is_named():
  cfg = _model(recurrentgemma.get_config("2b"))
  with pytest.raises(hf_mapping.NotExpressible, match="model_type='llama'"):
    hf_mapping.check_hf_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, cfg)
  fields = hf_mapping.hf_config(cfg, pad_id=0, eos_id=1, bos_id=2, dtype="float32")
  fields.update(hidden_size=2048, num_key_value_heads=10)
  with pytest.raises(hf_mapping.NotExpressible) as e:
    hf_mapping.check_hf_config(fields, cfg)
  assert "config.model.width=2048" in str(e.value) and "num_key_value_heads=10" in str(e.value)


# ------------------------------------------------------------------------------------ CLI refusals


def _workdir(path, with_checkpoint=True):
  config = small_config(model__logits_soft_cap=30.0, model__embeddings_scale_by_sqrt_dim=True)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  if with_checkpoint:
    cfg = _model(config)
    m = ckpt.CheckpointManager(os.path.join(path, "checkpoints"), ckpt.CheckpointOptions(1, 3, 0, False))
    m.save(4, _params(cfg), {"step": np.int32(4)}, {})
    m.close()
  return str(path)


def _export(*args):
  return subprocess.run([sys.executable, "-m", "recurrentgemma_tpu.checkpoints.export_hf", *args],
                        cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=300)


def _one_error_line(proc, *needles, alone=True):
  """Exit 2 and one `error:` line (the last; with `alone`, the only line on stderr) naming needles."""
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error")]
  assert errors == lines[-1:] and (len(lines) == 1 or not alone), proc.stderr[-2000:]
  for needle in needles:
    assert needle in errors[0], errors[0]


def test_export_refuses_a_workdir_without_checkpoint(tmp_path):
  wd = _workdir(tmp_path / "wd", with_checkpoint=False)
  _one_error_line(_export(f"--workdir={wd}", f"--output={tmp_path / 'out'}"),
                  "has no checkpoint to export")


def test_export_refuses_an_unknown_step_and_a_non_empty_output(tmp_path):
  wd = _workdir(tmp_path / "wd")
  _one_error_line(_export(f"--workdir={wd}", "--step=7", f"--output={tmp_path / 'out'}"),
                  "--step=7", "[4]")
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("x")
  _one_error_line(_export(f"--workdir={wd}", f"--output={tmp_path / 'out'}"),
                  f"--output={tmp_path / 'out'} is not empty")
  assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_init_from_an_hf_directory_of_another_architecture_fails_at_build(tmp_path):
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  (tmp_path / "llama").mkdir()
  (tmp_path / "llama" / "config.json").write_text(json.dumps(
      {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
  config = small_config(checkpoint__init_from=f"hf:{tmp_path / 'llama'}")
  with pytest.raises(ValueError, match="model_type='llama'.*only transformers' RecurrentGemma"):
    experiment_lib.build(config, num_devices=1)
  config = small_config(checkpoint__init_from=f"hf:{tmp_path / 'missing'}")
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    experiment_lib.build(config, num_devices=1)


# ------------------------------------------------------------------------------------ config time


def test_summary_and_start_up_block_say_whether_a_run_exports():
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu.model import summary  # pylint: disable=g-import-not-at-top
  plain = _model(ladder.get_config("griffin,100m"))
  text = summary.format_summary(plain, summary.summarize(plain, 2048))
  assert "Hugging Face export: not expressible" in text
  assert "lru_width = 1024: HF splits the RG-LRU gates into num_heads=6 blocks" in text
  variant = _model(ladder.get_config("griffin,100m,hf"))
  assert "Hugging Face export: exact" in summary.format_summary(variant, summary.summarize(variant, 2048))
  for config, expected in ((small_config(), "no: transformers cannot express logits_soft_cap=0.0"),
                           (small_config(model__logits_soft_cap=30.0,
                                         model__embeddings_scale_by_sqrt_dim=True), "yes, exactly")):
    rows = dict(cli.experiment_rows(experiment_lib.build(config, num_devices=1)))
    assert rows["hf export"].startswith(expected), rows["hf export"]


def test_model_fields_read_back_from_an_hf_config():
  cfg = _model(recurrentgemma.get_config("2b"))
  fields = hf_mapping.model_fields_from_hf(
      hf_mapping.hf_config(cfg, pad_id=0, eos_id=1, bos_id=2, dtype="bfloat16"))
  back = cfg.replace(**fields)
  assert back == cfg.replace(head_dim=0, num_gate_blocks=0)
  assert fields["block_pattern"] == "recurrent,recurrent,local_attention"
  assert fields["attention_window"] == 2048 and fields["mlp_expansion"] == 3


@pytest.mark.slow
def test_train_refuses_init_from_an_hf_directory_of_another_architecture(tmp_path):
  from test_train_common import train_command  # pylint: disable=g-import-not-at-top
  (tmp_path / "llama").mkdir()
  (tmp_path / "llama" / "config.json").write_text(json.dumps(
      {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
  proc = subprocess.run(train_command(str(tmp_path / "wd"), f"--init_from=hf:{tmp_path / 'llama'}"),
                        cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
  # The trainer logs its compilation cache before building the experiment.
  _one_error_line(proc, "model_type='llama'", "only transformers' RecurrentGemma", alone=False)
  assert not (tmp_path / "wd" / "checkpoints").exists()


def test_the_bridge_and_the_training_modules_import_without_torch():
  code = ("import sys\n"
          "from recurrentgemma_tpu.checkpoints import export_hf, hf_bridge, hf_mapping, resume\n"
          "from recurrentgemma_tpu import experiment, trainer\n"
          "from recurrentgemma_tpu.model import summary\n"
          "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(1),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]"
