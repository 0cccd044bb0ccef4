"""One downstream evaluation of a workdir's checkpoint, and the hook the trainer calls every N steps.

Both end in `harness.evaluate` and `results.write`: the same numbers, files and TensorBoard scalars
whether the command line or the training loop asked for them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from absl import logging
import jax

from recurrentgemma_tpu import experiment as experiment_lib
from recurrentgemma_tpu import step_functions
from recurrentgemma_tpu.data import vocab as vocab_lib
from recurrentgemma_tpu.downstream import config as config_lib
from recurrentgemma_tpu.downstream import harness
from recurrentgemma_tpu.downstream import loading
from recurrentgemma_tpu.downstream import registry
from recurrentgemma_tpu.downstream import results as results_lib


def evaluate_workdir(workdir: str, step: int | None, overrides: Mapping[str, Any]
                     ) -> tuple[int, dict[str, float], str]:
  """Evaluates checkpoint `step` (None: the newest) of `workdir` with config.eval + `overrides`.

  Every user error (no config, no checkpoint, unknown step, unknown task, bad setting) is raised
  before parameters are read or anything is compiled.

  Returns:
    (step, flat scores, the results file written by process 0 or "").
  """
  exp = experiment_lib.from_workdir(workdir)
  step = loading.choose_step(workdir, step)
  try:
    eval_config = dataclasses.replace(exp.eval, **overrides)
  except ValueError as e:
    raise ValueError(str(e).replace("config.eval.", "--")) from e
  manager = registry.check_tasks(eval_config.task_names)
  vocab = loading.existing_vocabulary(exp)
  fns, params = loading.load_params(exp, workdir, step)
  scores, details = harness.evaluate(fns, params, vocab, eval_config, row_len=exp.data.seq_len,
                                     manager=manager)
  path = ""
  if jax.process_index() == 0:
    path = results_lib.write(workdir, step, scores, details)
  return step, scores, path


class DuringTraining:
  """`config.eval` in the training loop: evaluates the live parameters every `every` steps."""

  def __init__(self, eval_config: config_lib.EvalConfig, fns: step_functions.StepFunctions,
               data_config: Any, workdir: str):
    self.config, self.fns, self.workdir = eval_config, fns, workdir
    self.row_len = data_config.seq_len
    self._data_config = data_config
    self._vocab: vocab_lib.Vocabulary | None = None
    self._manager = None

  def due(self, step: int) -> bool:
    return bool(self.config.every) and step % self.config.every == 0

  def __call__(self, params: Any, step: int) -> dict[str, float]:
    if self._vocab is None:  # the pipeline has prepared (or found) the tokenizer by now
      self._vocab = vocab_lib.Vocabulary(vocab_lib.tokenizer_path(self._data_config),
                                         self.fns.model_config.vocab_size)
      self._manager = registry.check_tasks(self.config.task_names)
    scores, details = harness.evaluate(self.fns, params, self._vocab, self.config,
                                       row_len=self.row_len, manager=self._manager)
    if jax.process_index() == 0:
      results_lib.write(self.workdir, step, scores, details)
      logging.info("[downstream] step %d | %s", step,
                   " | ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    return scores
