"""Sampling with the recurrent cache against full-sequence recomputation with `model.apply`."""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrentgemma_tpu import model as model_lib
from recurrentgemma_tpu import sample
from recurrentgemma_tpu import workdir as workdir_lib
from recurrentgemma_tpu.checkpoints import manager as ckpt
from test_train_common import small_config

NEW = 10


@pytest.fixture(scope="module")
def model():
  # Window 8 < prompt + generated length, so the local-attention ring buffer wraps during decoding.
  config = small_config(model__attention_window=8)
  model_config = model_lib.ModelConfig.from_config(config.model)
  params = flax.core.meta.unbox(model_lib.init_params(model_config, jax.random.key(1)))
  # Sharpen the random model's distribution so greedy choices are not near-ties.
  params = jax.tree.map(lambda x: x * 3.0, params)
  return config, model_config, params


def _prompt(batch=2, length=5):
  return jax.random.randint(jax.random.key(7), (batch, length), 3, 1000, jnp.int32)


def test_greedy_matches_recomputing_the_whole_sequence(model):
  _, mc, params = model
  prompt = _prompt()
  got = np.asarray(sample.generate(params, prompt, jax.random.key(0), model_config=mc,
                                   max_new_tokens=NEW))
  # No cache: the whole (zero-padded) sequence through `apply` at every step. The model is causal,
  # so the padding after position t cannot change the logits at t, and one compile serves all steps.
  apply = jax.jit(model_lib.apply, static_argnums=1)
  t0 = prompt.shape[1]
  seq = np.zeros((prompt.shape[0], t0 + NEW), np.int32)
  seq[:, :t0] = prompt
  for t in range(t0, t0 + NEW):
    seq[:, t] = np.asarray(jnp.argmax(apply(params, mc, jnp.asarray(seq))[:, t - 1], -1))
  np.testing.assert_array_equal(got, seq[:, t0:])


@pytest.mark.slow  # over ~30 s on 2 cores: the slow tier (.ci/run)
def test_top_k_sampling_stays_in_the_top_k_and_is_seeded(model):
  _, mc, params = model
  prompt = jnp.tile(_prompt(1), (64, 1))
  kw = dict(model_config=mc, max_new_tokens=1, temperature=1.0)
  first = np.asarray(sample.generate(params, prompt, jax.random.key(3), top_k=3, **kw))[:, 0]
  top3 = np.argsort(np.asarray(model_lib.apply(params, mc, prompt[:1])[0, -1]))[-3:]
  assert set(first) <= set(top3.tolist()) and len(set(first)) > 1
  again = np.asarray(sample.generate(params, prompt, jax.random.key(3), top_k=3, **kw))[:, 0]
  np.testing.assert_array_equal(first, again)
  # top_k=1 is greedy whatever the temperature.
  greedy = np.asarray(sample.generate(params, prompt[:1], jax.random.key(0), model_config=mc,
                                      max_new_tokens=NEW))
  top1 = np.asarray(sample.generate(params, prompt[:1], jax.random.key(9), model_config=mc,
                                    max_new_tokens=NEW, temperature=5.0, top_k=1))
  np.testing.assert_array_equal(top1, greedy)


def test_sample_text_from_a_workdir(model, tmp_path):
  config, mc, params = model
  m = ckpt.CheckpointManager(tmp_path / workdir_lib.CONFIG_FILE.replace("config.json", "checkpoints"),
                             ckpt.CheckpointOptions(1, 1, 0, False))
  m.save(5, params, {"step": jnp.int32(5)}, {})
  m.close()
  with open(os.path.join(tmp_path, workdir_lib.CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort())
  texts = sample.sample_text(str(tmp_path), "def f(x):", max_new_tokens=NEW)
  from recurrentgemma_tpu import data as data_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  vocab = vocab_lib.Vocabulary(vocab_lib.tokenizer_path(data_lib.data_config_from(config)), 1024)
  prompt = jnp.asarray([[vocab.bos_id] + vocab.encode("def f(x):")], jnp.int32)
  ids = np.asarray(sample.generate(params, prompt, jax.random.key(0), model_config=mc,
                                   max_new_tokens=NEW))[0].tolist()
  if vocab.eos_id in ids:
    ids = ids[:ids.index(vocab.eos_id)]
  assert texts == [vocab.decode(ids)]


@pytest.mark.parametrize("kw, match", [
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"temperature": -1.0}, "temperature=-1.0"),
    ({"top_k": 5000}, "top_k=5000"),
])
def test_bad_sampling_arguments(kw, match):
  args = {"max_new_tokens": 4, "temperature": 1.0, "top_k": 0, **kw}
  with pytest.raises(ValueError, match=match):
    sample.check_sampling_args(vocab_size=1024, **args)
