"""lm-eval-harness with our JAX model: the `LM` adapter and one evaluation of a set of parameters.

`JaxLM` is an lm-eval `TemplateLM`: lm-eval's own code turns (context, continuation) strings into
tokens exactly as its Hugging Face backend does (trailing whitespace of the context moves to the
continuation, the pair is encoded whole and split), so our numbers and its numbers are comparable
request by request. What happens to the tokens is ours (`scoring.Scorer`): packed rows, one prefill
per shared context, greedy decoding with the recurrent cache, on the training mesh. Nothing here
imports torch.

BOS is explicit (`add_bos`, default on, because training rows start with BOS): every context and
every rolling-log-likelihood document starts with exactly one BOS. lm-eval's HF backend has no rule
for this model; with `add_bos_token=True` its rolling log-likelihood scores a second BOS
(docs/evaluation.md).
"""

from __future__ import annotations

import collections
import json
import os
import time
from importlib import metadata
from typing import Any, Sequence

from lm_eval import evaluator as lm_evaluator
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from recurrentgemma_tpu import step_functions
from recurrentgemma_tpu.data import vocab as vocab_lib
from recurrentgemma_tpu.downstream import config as config_lib
from recurrentgemma_tpu.downstream import registry
from recurrentgemma_tpu.downstream import results as results_lib
from recurrentgemma_tpu.downstream import scoring

DEFAULT_MAX_GEN_TOKS = 256


class JaxLM(TemplateLM):
  """Our model as an lm-eval language model (see the module docstring).

  Args:
    scorer: the model, its parameters and row shapes.
    vocab: the run's tokenizer.
    add_bos: start every context and rolling document with BOS.
    shared_context: run a context shared by several continuations once (else pack every request).
  """

  def __init__(self, scorer: scoring.Scorer, vocab: vocab_lib.Vocabulary, *, add_bos: bool = True,
               shared_context: bool = True):
    super().__init__()
    self.scorer, self.vocab = scorer, vocab
    self.add_bos, self.shared_context = add_bos, shared_context
    self.backend = "causal"

  @property
  def eot_token_id(self) -> int:
    return self.vocab.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.vocab.bos_id

  @property
  def max_length(self) -> int:
    return self.scorer.row_len

  @property
  def tokenizer_name(self) -> str:
    return os.path.basename(self.vocab.path)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    del kwargs
    bos = self.add_bos if add_special_tokens is None else add_special_tokens
    return ([self.vocab.bos_id] if bos else []) + self.vocab.encode(string)

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self.vocab.decode(tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    del disable_tqdm, kwargs
    return loglikelihood_tokens(self.scorer, [(c, k) for _, c, k in requests],
                                shared_context=self.shared_context)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    del disable_tqdm
    windows, owners = [], []
    for i, (text,) in enumerate(r.args for r in requests):
      tokens = self.tok_encode(text, add_special_tokens=False)
      for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1)):
        windows.append((ctx, cont))
        owners.append(i)
    scores = loglikelihood_tokens(self.scorer, windows, shared_context=False)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owners, scores):
      totals[i] += logp
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    del disable_tqdm
    out: list[str] = [""] * len(requests)
    by_kwargs = collections.defaultdict(list)
    for i, r in enumerate(requests):
      context, gen_kwargs = r.args
      by_kwargs[json.dumps(gen_kwargs, sort_keys=True, default=str)].append((i, context))
    for key, items in by_kwargs.items():
      gen_kwargs = json.loads(key)
      until = gen_kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
      keep = max(self.max_length - max_new, 1)
      contexts = [self.tok_encode(c)[-keep:] for _, c in items]
      for (i, _), tokens in zip(items, self.scorer.generate(contexts, max_new)):
        if self.eot_token_id in tokens:
          tokens = tokens[:tokens.index(self.eot_token_id)]
        text = self.tok_decode(tokens)
        for stop in until:
          text = text.split(stop)[0]
        out[i] = text
    return out


def loglikelihood_tokens(scorer: scoring.Scorer, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                         *, shared_context: bool = True) -> list[tuple[float, bool]]:
  """(log p(continuation | context), greedy) per (context tokens, continuation tokens) request.

  With `shared_context`, requests that share a context (a multiple-choice question) run it once
  and branch its decoding cache; the others are packed into rows. Contexts are cut from the left to
  at most row_len + 1 tokens with their continuation, as lm-eval's backends do.
  """
  L = scorer.row_len
  trimmed = []
  for ctx, cont in requests:
    if not ctx or not cont or len(cont) > L:
      raise ValueError(f"a request needs a context and 1 to {L} continuation tokens; got "
                       f"{len(ctx)} and {len(cont)}")
    whole = (list(ctx) + list(cont))[-(L + 1):]
    trimmed.append((tuple(whole[:-len(cont)]), list(cont)))
  out: list[tuple[float, bool] | None] = [None] * len(trimmed)
  groups: dict[tuple[int, ...], list[int]] = collections.defaultdict(list)
  for i, (ctx, _) in enumerate(trimmed):
    groups[ctx].append(i)
  shared = {c: ids for c, ids in groups.items() if shared_context and len(ids) > 1}
  if shared:
    contexts = list(shared)
    scores = scorer.score_shared(contexts, [[trimmed[i][1] for i in shared[c]] for c in contexts])
    for c, group_scores in zip(contexts, scores):
      for i, s in zip(shared[c], group_scores):
        out[i] = s
  rest = [i for i in range(len(trimmed)) if out[i] is None]
  if rest:
    scores = scorer.score([list(trimmed[i][0]) + trimmed[i][1] for i in rest],
                          [len(trimmed[i][1]) for i in rest])
    for i, s in zip(rest, scores):
      out[i] = s
  return out  # type: ignore[return-value]


def run_tasks(lm: Any, eval_config: config_lib.EvalConfig, manager: Any = None) -> dict[str, Any]:
  """lm-eval's `simple_evaluate` of `lm` on the configured tasks; its result dict (no samples)."""
  names = list(eval_config.task_names)
  manager = registry.check_tasks(names, manager)
  return lm_evaluator.simple_evaluate(
      model=lm, tasks=names, task_manager=manager,
      num_fewshot=None if eval_config.num_fewshot < 0 else eval_config.num_fewshot,
      limit=eval_config.limit or None, bootstrap_iters=0, log_samples=False,
      torch_random_seed=None)  # seeds python and numpy only: nothing here needs torch


def evaluate(fns: step_functions.StepFunctions, params: Any, vocab: vocab_lib.Vocabulary,
             eval_config: config_lib.EvalConfig, *, row_len: int, manager: Any = None
             ) -> tuple[dict[str, float], dict[str, Any]]:
  """Runs the configured tasks on `params`; (flat scores, details for the results file)."""
  scorer = scoring.Scorer(fns, params, row_len=eval_config.max_length or row_len,
                          batch_rows=eval_config.batch_size)
  lm = JaxLM(scorer, vocab, add_bos=eval_config.add_bos, shared_context=eval_config.shared_context)
  start = time.perf_counter()
  out = run_tasks(lm, eval_config, manager)
  seconds = time.perf_counter() - start
  details = {"tasks": list(eval_config.task_names), "seconds": round(seconds, 2),
             "settings": {"limit": eval_config.limit, "num_fewshot": eval_config.num_fewshot,
                          "batch_rows": scorer.batch_rows, "row_len": scorer.row_len,
                          "add_bos": eval_config.add_bos, "shared_context": eval_config.shared_context},
             "results": out["results"], "n-samples": out.get("n-samples", {}),
             "versions": out.get("versions", {}), "lm_eval_version": metadata.version("lm_eval")}
  return results_lib.flatten(out["results"]), details
