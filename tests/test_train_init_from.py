"""`--init_from` a checkpoint converted from the published RecurrentGemma (reference package) layout."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from recurrentgemma_tpu import experiment as experiment_lib
from recurrentgemma_tpu import trainer
from recurrentgemma_tpu.checkpoints import convert
from recurrentgemma_tpu.checkpoints import manager as ckpt
from test_train_common import small_config


def _published_checkpoint(path):
  """A small Griffin of the reference package, saved the way the published checkpoints are."""
  import recurrentgemma.jax as rg  # pylint: disable=g-import-not-at-top
  cfg = rg.GriffinConfig(
      vocab_size=1024, width=64, mlp_expanded_width=192, num_heads=2,
      block_types=(rg.TemporalBlockType.RECURRENT, rg.TemporalBlockType.RECURRENT,
                   rg.TemporalBlockType.ATTENTION),
      embeddings_scale_by_sqrt_dim=True, attention_window_size=32, logits_soft_cap=30.0,
      lru_width=64)
  tokens = jnp.ones((1, 4), jnp.int32)
  params = rg.Griffin(cfg).init(jax.random.key(5), tokens, jnp.arange(4)[None])["params"]
  ocp.PyTreeCheckpointer().save(str(path), params)
  return params


def test_init_from_converted_published_checkpoint(tmp_path):
  _published_checkpoint(tmp_path / "published")
  convert.convert(str(tmp_path / "published"), str(tmp_path / "converted"),
                  embeddings_scale_by_sqrt_dim=True, attention_window_size=32, logits_soft_cap=30.0)
  with open(tmp_path / "converted" / "model_config.json") as f:
    fields = json.load(f)
  overrides = {f"model__{k}": v for k, v in fields.items()}
  config = small_config(checkpoint__init_from=str(tmp_path / "converted"), **overrides)
  t = trainer.Trainer(experiment_lib.build(config), str(tmp_path / "work"))
  state, step = t.initial_state()
  t.ckpt.close()
  assert step == 0 and int(state.step) == 0
  converted = ckpt.load_params(tmp_path / "converted", jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t.fns.abstract_state.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(converted))
  # Fresh optimizer moments (zeros), laid out like the parameters they belong to.
  mu = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert mu and all(not np.asarray(x).any() for x in mu)
  for leaf, sharding in zip(jax.tree.leaves(state.params), jax.tree.leaves(t.fns.state_shardings.params)):
    assert leaf.sharding == sharding
