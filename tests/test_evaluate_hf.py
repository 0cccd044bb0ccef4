"""Our lm-eval adapter against lm-eval's own Hugging Face backend on the exported model (slow).

A shrunk tiny-preset Griffin that transformers expresses (soft cap and embedding scale on, window 32
shorter than the contexts) is exported with `checkpoints.export_hf`; lm-eval then runs the offline
tasks twice, once through `HFLM` on the exported checkpoint (torch, CPU, float32) and once through
`JaxLM`, and the per-request numbers must agree.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from lm_eval import evaluator  # pylint: disable=g-import-not-at-top,wrong-import-position

from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=wrong-import-position
from recurrentgemma_tpu.checkpoints import manager as ckpt  # pylint: disable=wrong-import-position
from recurrentgemma_tpu.downstream import harness, loading, registry, scoring  # pylint: disable=wrong-import-position
from test_train_common import REPO, small_config, subprocess_env  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.slow

ROW_LEN = 256  # contexts (~150 tokens) fit whole; rolling documents take several windows
STEP = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from lm_eval.models.huggingface import HFLM  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import model as model_lib  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("hf_eval")
  workdir, out = str(root / "run"), str(root / "hf")
  config = small_config(model__logits_soft_cap=30.0, model__embeddings_scale_by_sqrt_dim=True)
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  cfg = model_lib.ModelConfig.from_config(config.model)
  # Sharpened random weights: log-likelihoods spread out, so accuracy is not decided by ties.
  params = jax.tree.map(lambda x: np.asarray(x) * 3.0, model_lib.init_params(cfg, jax.random.key(3)))
  m = ckpt.CheckpointManager(os.path.join(workdir, "checkpoints"), ckpt.CheckpointOptions(1, 3, 0, False))
  m.save(STEP, params, {"step": np.int32(STEP)}, {})
  m.close()
  proc = subprocess.run([sys.executable, "-m", "recurrentgemma_tpu.checkpoints.export_hf",
                         f"--workdir={workdir}", f"--output={out}"], cwd=REPO,
                        env=subprocess_env(1), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]

  exp = experiment_lib.from_workdir(workdir)
  fns, jax_params = loading.load_params(exp, workdir, STEP)
  scorer = scoring.Scorer(fns, jax_params, row_len=ROW_LEN, batch_rows=8)
  ours = harness.JaxLM(scorer, loading.existing_vocabulary(exp))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)

  def hf(add_bos, batch_size=8):
    return HFLM(pretrained=hf_model, tokenizer=tokenizer, add_bos_token=add_bos, max_length=ROW_LEN,
                batch_size=batch_size, device="cpu")

  return ours, hf, hf_model, tokenizer


def _run(lm, task, limit):
  out = evaluator.simple_evaluate(model=lm, tasks=[task], limit=limit, bootstrap_iters=0,
                                  log_samples=True, task_manager=registry.task_manager([task]),
                                  torch_random_seed=None)
  samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
  return out["results"][task], samples


def test_multiple_choice_log_likelihoods_equal_the_hf_backend(models):
  ours, hf, _, _ = models
  task = "rg_stdlib_next_line"
  our_results, our_samples = _run(ours, task, 24)
  hf_results, hf_samples = _run(hf(add_bos=True), task, 24)
  assert len(our_samples) == len(hf_samples) == 24
  worst = worst_rel = 0.0
  for a, b in zip(our_samples, hf_samples):
    assert a["arguments"] == b["arguments"]  # the same prompts and choices
    for (ll_a, greedy_a), (ll_b, greedy_b) in zip((r[0] for r in a["resps"]),
                                                  (r[0] for r in b["resps"])):
      worst = max(worst, abs(ll_a - ll_b))
      worst_rel = max(worst_rel, abs(ll_a - ll_b) / abs(ll_b))
      # Within 1e-4, or 1e-6 of the value: transformers sums a continuation's float32 log-probs in
      # float32, so a long one (the sharpened model gives ~ -250) differs by float32 rounding.
      assert ll_a == pytest.approx(ll_b, abs=1e-4, rel=1e-6), (a["doc_id"], ll_a, ll_b)
      assert greedy_a == greedy_b
  print(f"largest log-likelihood difference over {len(our_samples)} questions: {worst:.2e} "
        f"absolute, {worst_rel:.2e} relative")
  assert our_results["acc,none"] == hf_results["acc,none"]
  assert our_results["acc_norm,none"] == hf_results["acc_norm,none"]


def test_rolling_log_likelihoods_equal_the_hf_backend_with_one_bos(models):
  ours, hf, _, _ = models
  task = "rg_stdlib_ppl"
  # lm-eval's HF backend with add_bos_token=True prefixes BOS *and* encodes one more, scoring
  # BOS after BOS; with False its rolling windows start with the one BOS ours uses.
  _, our_samples = _run(ours, task, 6)
  _, hf_samples = _run(hf(add_bos=False), task, 6)
  for a, b in zip(our_samples, hf_samples):
    ll_a, ll_b = a["resps"][0][0], b["resps"][0][0]
    assert ll_a == pytest.approx(ll_b, rel=1e-5, abs=1e-3), (a["doc_id"], ll_a, ll_b)


def test_greedy_generation_equals_transformers_generate(models):
  import torch  # pylint: disable=g-import-not-at-top
  ours, _, hf_model, tokenizer = models
  docs = registry.task_manager(["rg_stdlib_complete"]).load(
      ["rg_stdlib_complete"])["tasks"]["rg_stdlib_complete"].dataset["test"]
  contexts = [ours.tok_encode(d["context"]) for d in list(docs)[:6]]
  # Token ids, not text: a random model emits byte-fallback pieces, whose text the two
  # detokenizers render differently (U+FFFD per byte or per sequence).
  assert contexts == [tokenizer(d["context"])["input_ids"] for d in list(docs)[:6]]
  new = 12
  got = ours.scorer.generate(contexts, new)  # one batch, contexts of different lengths
  for ctx, tokens in zip(contexts, got):
    # One context per call: transformers' recurrent state would read left padding.
    ref = hf_model.generate(torch.tensor([ctx]), attention_mask=torch.ones(1, len(ctx), dtype=torch.long),
                            max_new_tokens=new, do_sample=False)
    eos = ours.eot_token_id
    if eos in tokens:  # transformers stops after EOS; ours runs on and lm-eval cuts there
      tokens = tokens[:tokens.index(eos) + 1]
    assert tokens == ref[0, len(ctx):].tolist()
