"""A training workdir as something to evaluate: its Experiment, a checkpoint step, parameters, tokenizer."""

from __future__ import annotations

import os
from typing import Any

from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import experiment as experiment_lib
from recurrentgemma_tpu import step_functions
from recurrentgemma_tpu import workdir as workdir_lib
from recurrentgemma_tpu.checkpoints import manager as ckpt_lib
from recurrentgemma_tpu.checkpoints import resume as resume_lib
from recurrentgemma_tpu.data import vocab as vocab_lib
from sharding import mesh as mesh_lib


def checkpoint_steps(workdir: str) -> list[int]:
  directory = workdir_lib.join(workdir, workdir_lib.CHECKPOINT_DIR)
  if not workdir_lib.isdir(directory):
    return []
  return sorted(int(d) for d in workdir_lib.listdir(directory) if d.isdigit())


def choose_step(workdir: str, step: int | None) -> int:
  """`step` if the workdir has a checkpoint of it, else its newest; UserError otherwise."""
  steps = checkpoint_steps(workdir)
  if not steps:
    raise exit_codes.UserError(f"--workdir={workdir} has no checkpoint yet "
                               f"({workdir_lib.join(workdir, workdir_lib.CHECKPOINT_DIR)} holds no "
                               "step): evaluate once training has saved one.")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise exit_codes.UserError(f"--step={step} has no checkpoint in {workdir}; its steps are "
                               f"{steps}.")
  return step


def load_params(exp: experiment_lib.Experiment, workdir: str, step: int
                ) -> tuple[step_functions.StepFunctions, Any]:
  """The step functions on this job's devices and the parameters of checkpoint `step`, sharded
  as in training."""
  fns = step_functions.build_step_functions(exp.model, exp.optimizer, mesh_lib.create_mesh(exp.mesh),
                                            exp.mesh.strategy)
  abstract_params, _ = resume_lib.abstract_checkpoint(fns)
  step_dir = workdir_lib.join(workdir, workdir_lib.CHECKPOINT_DIR, str(step))
  return fns, ckpt_lib.load_params(step_dir, abstract_params)


def existing_vocabulary(exp: experiment_lib.Experiment) -> vocab_lib.Vocabulary:
  """The run's tokenizer, found (never trained) in the data cache or at data.tokenizer."""
  data = exp.data
  if data.tokenizer:
    path = vocab_lib.tokenizer_path(data)
  else:
    default = next((s for s in data.sources if s.kind == "default"), None)
    path = vocab_lib.embedded_model_path(data, default) if default is not None else ""
    if not path or not os.path.exists(path):
      raise exit_codes.UserError(
          f"the run's tokenizer is not in the data cache ({path or data.resolved_cache_dir}); "
          "evaluation never trains one: prepare the data on this machine first "
          "(rg-prepare-data with the workdir's config) or set data.tokenizer.")
  return vocab_lib.Vocabulary(path, exp.model.vocab_size)
