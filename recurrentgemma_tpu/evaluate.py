r"""Downstream evaluation of a training checkpoint with lm-eval-harness, run by our JAX model.

  python -m recurrentgemma_tpu.evaluate --workdir=DIR [--step=N] --tasks=T1,T2 [--limit=N] \
      [--num_fewshot=K] [--batch_size=B]

Runs on every JAX device of the job with the training mesh and shardings (a TPU pod runs it on
every host, like training). Requests are packed into rows with document resets; the context of a
multiple-choice question runs once and its recurrent state is branched per choice. Scores go to
DIR/downstream/step_N.json and TensorBoard (DIR/tensorboard/downstream). `--tasks=rg_stdlib`
runs the offline tasks shipped with the package; any lm-eval task works where its data can be
fetched. Unset flags take the workdir's config.eval values. Needs the `eval` extra (lm-eval).
"""

from __future__ import annotations


from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).")
_TASKS = flags.DEFINE_string("tasks", None, "Comma-separated lm-eval task, group or tag names "
                             "(default: config.eval.tasks; rg_stdlib = the offline tasks).")
_LIMIT = flags.DEFINE_integer("limit", None, "Documents per task (0: all; default config.eval.limit).")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (-1: the task's default).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Rows per forward pass.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}.")
  from recurrentgemma_tpu.downstream import config as eval_lib  # pylint: disable=g-import-not-at-top
  eval_lib.require_lm_eval()
  from recurrentgemma_tpu.downstream import evaluation  # pylint: disable=g-import-not-at-top
  overrides = {k: v for k, v in (("tasks", _TASKS.value), ("limit", _LIMIT.value),
                                 ("num_fewshot", _NUM_FEWSHOT.value),
                                 ("batch_size", _BATCH_SIZE.value)) if v is not None}
  step, scores, path = evaluation.evaluate_workdir(_WORKDIR.value, _STEP.value, overrides)
  for name, value in scores.items():
    print(f"{name:<48} {value:.6g}")
  if path:
    print(f"step {step}: {path}")


def run() -> None:
  """Console-script entry point (`rg-evaluate`)."""
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  flags.mark_flags_as_required(["workdir"])
  cli.run(main, __doc__)


if __name__ == "__main__":
  run()
