"""A training workdir as something to evaluate: its Experiment, a checkpoint step, parameters, tokenizer."""

from __future__ import annotations

from typing import Any

from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import experiment as experiment_lib
from recurrentgemma_tpu import step_functions
from recurrentgemma_tpu import workdir as workdir_lib
from recurrentgemma_tpu.checkpoints import manager as ckpt_lib
from recurrentgemma_tpu.checkpoints import resume as resume_lib
from recurrentgemma_tpu.data import vocab as vocab_lib
from sharding import mesh as mesh_lib


def choose_step(workdir: str, step: int | None) -> int:
  """`step` if the workdir has a checkpoint of it, else its newest; UserError otherwise."""
  steps = workdir_lib.checkpoint_steps(workdir)
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
  return vocab_lib.Vocabulary(vocab_lib.existing_tokenizer_path(exp.data), exp.model.vocab_size)
