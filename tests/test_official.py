"""Parity with the reference `recurrentgemma` package: converted parameters give its logits."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

rg_common = pytest.importorskip("recurrentgemma.common")
rg_griffin = pytest.importorskip("recurrentgemma.jax.griffin")

from recurrentgemma_tpu.checkpoints import convert, import_official, manager  # noqa: E402
from recurrentgemma_tpu.checkpoints.official import official_config_from_params  # noqa: E402
from recurrentgemma_tpu.model import apply, init_params  # noqa: E402

R = rg_common.TemporalBlockType.RECURRENT
A = rg_common.TemporalBlockType.ATTENTION

# Reduced configs: widths, lru_width != width, several heads, soft-cap on/off, windows shorter
# than the sequence, a remainder after the last (R, R, A) group, other patterns.
CASES = {
    "griffin_softcap_scaled": dict(width=64, mlp_expanded_width=192, num_heads=4, lru_width=96,
                                   block_types=(R, R, A, R, R), embeddings_scale_by_sqrt_dim=True,
                                   attention_window_size=8, logits_soft_cap=30.0),
    "hawk_no_cap": dict(width=48, mlp_expanded_width=144, num_heads=2, lru_width=None,
                        block_types=(R, R, R), embeddings_scale_by_sqrt_dim=False,
                        attention_window_size=8, logits_soft_cap=0.0),
    "alternating_many_heads": dict(width=64, mlp_expanded_width=192, num_heads=8, lru_width=128,
                                   block_types=(R, A, R, A), embeddings_scale_by_sqrt_dim=True,
                                   attention_window_size=5, logits_soft_cap=0.0),
}


def _official_model(case: str, vocab: int = 97):
  cfg = rg_common.GriffinConfig(vocab_size=vocab, scan_type=rg_common.ScanType.LINEAR_NATIVE,
                                **CASES[case])
  return cfg, rg_griffin.Griffin(cfg, gradient_checkpointing=False)


def _official_params(model, tokens, pos):
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens, pos)["params"]
  # Norm scales and biases start at zero; perturb everything so each is exercised.
  rng = np.random.default_rng(5)
  return jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), params)


def _packed_inputs(B=2, T=37, vocab=97):
  tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, vocab)
  pos = np.tile(np.arange(T), (B, 1))
  pos[1, 11:] = np.arange(T - 11)  # row 1 packs three documents
  pos[1, 30:] = np.arange(T - 30)
  return tokens, jnp.asarray(pos, jnp.int32)


@functools.lru_cache(maxsize=None)
def _case(case: str):
  """(official config, official params, official logits) on packed inputs; built once per case."""
  official_cfg, model = _official_model(case)
  tokens, pos = _packed_inputs()
  params = _official_params(model, tokens, pos)
  ref, _ = jax.jit(lambda p: model.apply({"params": p}, tokens, pos, return_cache=False))(params)
  return official_cfg, params, np.asarray(ref)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.slow  # over ~30 s on 2 cores: the slow tier (.ci/run)
def test_long_packed_rows_with_window_past_the_row_match_official():
  """T > model.attention.CAUSAL_CHUNK with window >= T: the causal strip attention path."""
  official_cfg = rg_common.GriffinConfig(
      vocab_size=97, scan_type=rg_common.ScanType.LINEAR_NATIVE, width=32, mlp_expanded_width=64,
      num_heads=2, lru_width=32, block_types=(R, A), embeddings_scale_by_sqrt_dim=True,
      attention_window_size=512, logits_soft_cap=0.0)
  model = rg_griffin.Griffin(official_cfg, gradient_checkpointing=False)
  B, T = 1, 300
  tokens = jax.random.randint(jax.random.PRNGKey(2), (B, T), 0, 97)
  pos = np.arange(T)[None].copy()
  pos[0, 200:] = np.arange(T - 200)  # a second document inside the last query chunk
  pos = jnp.asarray(pos, jnp.int32)
  params = _official_params(model, tokens, pos)
  ref, _ = jax.jit(lambda p: model.apply({"params": p}, tokens, pos, return_cache=False))(params)
  cfg, ours = import_official(params, official_cfg)
  assert _rel_err(apply(ours, cfg, tokens, positions=pos), ref) <= 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_params_reproduce_official_logits(case):
  official_cfg, params, ref = _case(case)
  tokens, pos = _packed_inputs()
  cfg, ours = import_official(params, official_cfg)
  assert cfg.num_layers == len(official_cfg.block_types)
  got = apply(ours, cfg, tokens, positions=pos)
  assert _rel_err(got, ref) <= 1e-5
  # Converted parameters have exactly the shapes our initialiser makes.
  mine = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  assert jax.tree.map(np.shape, ours) == jax.tree.map(lambda s: s.shape, mine)


def test_config_inferred_from_shapes_matches_the_package():
  _, params, _ = _case("griffin_softcap_scaled")
  theirs = rg_common.GriffinConfig.from_flax_params_or_variables(
      params, preset=None, embeddings_scale_by_sqrt_dim=True, attention_window_size=8,
      logits_soft_cap=30.0)
  ours = official_config_from_params(params, embeddings_scale_by_sqrt_dim=True,
                                     attention_window_size=8, logits_soft_cap=30.0)
  for name in ("vocab_size", "width", "mlp_expanded_width", "num_heads", "lru_width",
               "embeddings_scale_by_sqrt_dim", "attention_window_size", "logits_soft_cap"):
    assert getattr(ours, name) == getattr(theirs, name), name
  assert ours.block_types == tuple(t.name for t in theirs.block_types)
  with pytest.raises(ValueError, match="cannot be read from parameters"):
    official_config_from_params(params)


def test_import_rejects_mismatched_config():
  official_cfg, params, _ = _case("hawk_no_cap")
  wrong = official_cfg._replace(block_types=(R, R))
  with pytest.raises(ValueError, match=r"blocks \['blocks.2'\] beyond"):
    import_official(params, wrong)


def test_convert_cli_writes_a_checkpoint_that_loads_and_matches(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  _, params, ref = _case("griffin_softcap_scaled")
  tokens, pos = _packed_inputs()
  src = os.path.join(tmp_path, "official")
  ocp.PyTreeCheckpointer().save(src, {"params": params})  # the reference's save_parameters
  out = os.path.join(tmp_path, "converted")
  cfg = convert.convert(src, out, preset="recurrentgemma_2b", attention_window_size=8)
  assert cfg.attention_window == 8 and cfg.logits_soft_cap == 30.0
  assert os.path.exists(os.path.join(out, "model_config.json"))
  abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  loaded = manager.load_params(out, abstract)
  assert _rel_err(apply(loaded, cfg, tokens, positions=pos), ref) <= 1e-5
