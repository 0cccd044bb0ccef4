"""The downstream scorer against the model run on each sequence alone (`model.apply`, one row each).

The model is the tiny preset shrunk (every block type; window 8, shorter than the sequences, so the
local-attention ring buffer wraps), on the 8-device CPU mesh of the training step functions.
"""

import jax
import numpy as np
import pytest

from recurrentgemma_tpu import experiment as experiment_lib
from recurrentgemma_tpu import model as model_lib
from recurrentgemma_tpu import step_functions
from recurrentgemma_tpu.downstream import scoring
from sharding import mesh as mesh_lib
from test_train_common import small_config


@pytest.fixture(scope="module")
def scorer():
  config = small_config(model__attention_window=8)
  exp = experiment_lib.build(config)
  fns = step_functions.build_step_functions(exp.model, exp.optimizer, mesh_lib.create_mesh(exp.mesh),
                                            exp.mesh.strategy)
  # Sharpen the random model so greedy choices are not near-ties.
  params = jax.tree.map(lambda x: x * 3.0, fns.create_state(jax.random.key(1)).params)
  return scoring.Scorer(fns, params, row_len=64, batch_rows=2)


REF_LEN = 128  # the reference pads every sequence to this (causal: the padding changes nothing before it)


def _logits_alone(scorer, tokens):
  """float64 logits of `tokens` as the only document of one row (one compile for every length)."""
  padded = np.zeros((1, REF_LEN), np.int32)
  padded[0, :len(tokens)] = tokens
  host = jax.device_get(scorer.params)
  return np.asarray(model_lib.apply(host, scorer.config, padded)[0, :len(tokens)], np.float64)


def _alone(scorer, seq, n):
  """Reference: the sequence as the only document of its own row, in float64 on the host."""
  logits = _logits_alone(scorer, seq[:-1])
  logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
  targets = np.asarray(seq[1:])
  picked = logp[np.arange(len(targets)), targets][-n:]
  greedy = np.argmax(logits, -1)[-n:] == targets[-n:]
  return float(picked.sum()), bool(greedy.all())


def _sequences(seed, count, lo=2, hi=40):
  rng = np.random.default_rng(seed)
  return [[2] + rng.integers(3, 1000, size=int(rng.integers(lo, hi))).tolist() for _ in range(count)]


def test_pack_first_fit_decreasing():
  rows = scoring.pack([5, 3, 8, 2, 6], 10)
  assert rows == [[2, 3], [4, 1], [0]]
  assert all(sum([5, 3, 8, 2, 6][i] for i in r) <= 10 for r in rows)
  with pytest.raises(ValueError, match="a row holds 1 to 10"):
    scoring.pack([11], 10)


def test_packed_rows_equal_one_request_per_row_and_the_model_alone(scorer):
  seqs = _sequences(0, 11)
  scored = [max(1, len(s) // 3) for s in seqs]
  packed = scorer.score(seqs, scored)
  assert len(scoring.pack([len(s) - 1 for s in seqs], scorer.row_len)) < len(seqs)  # really packed
  single = dataclasses_replace(scorer, pack=False).score(seqs, scored)
  for (lp, g), (lp1, g1), s, n in zip(packed, single, seqs, scored):
    ref_lp, ref_g = _alone(scorer, s, n)
    assert lp == pytest.approx(ref_lp, abs=2e-4, rel=1e-5)
    assert lp == pytest.approx(lp1, abs=2e-4, rel=1e-5)
    assert g == g1 == ref_g


def test_long_sequences_keep_their_last_row_len_inputs(scorer):
  seq = _sequences(1, 1, 100, 101)[0]
  (lp, _), = scorer.score([seq], [5])
  ref, _ = _alone(scorer, seq[-(scorer.row_len + 1):], 5)
  assert lp == pytest.approx(ref, abs=2e-4, rel=1e-5)


def test_shared_context_equals_each_choice_run_alone(scorer):
  rng = np.random.default_rng(2)
  # Contexts of 1 and 2 tokens leave left-padding inputs in the conv tail unless it is cleared;
  # 30 tokens wrap the window-8 ring buffer.
  contexts = [[2], [2, 17], [2] + rng.integers(3, 1000, 29).tolist(), [2, 5, 6, 7, 8]]
  continuations = [[rng.integers(3, 1000, int(rng.integers(1, 6))).tolist() for _ in range(k)]
                   for k in (4, 2, 3, 1)]
  got = scorer.score_shared(contexts, continuations)
  for ctx, conts, scores in zip(contexts, continuations, got):
    assert len(scores) == len(conts)
    for cont, (lp, g) in zip(conts, scores):
      ref_lp, ref_g = _alone(scorer, ctx + cont, len(cont))
      assert lp == pytest.approx(ref_lp, abs=2e-4, rel=1e-5)
      assert g == ref_g


def test_greedy_generation_equals_recomputing_the_sequence(scorer):
  contexts = [[2], [2, 9], [2] + list(range(100, 120)), [2, 40, 41, 42]]
  new = 6
  got = scorer.generate(contexts, new)
  for ctx, tokens in zip(contexts, got):
    seq = list(ctx)
    for _ in range(new):
      seq.append(int(np.argmax(_logits_alone(scorer, seq)[-1])))
    assert tokens == seq[len(ctx):]


def dataclasses_replace(scorer, **changes):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(scorer, **changes)
