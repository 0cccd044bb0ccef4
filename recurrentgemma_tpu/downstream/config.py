"""`EvalConfig`: the typed `config.eval` group (downstream evaluation with lm-eval-harness).

jax- and lm-eval-free, so `experiment.build` and the command line check it before anything heavy
is imported; task names are checked against lm-eval's registry by `harness.check_tasks`.
"""

from __future__ import annotations

import dataclasses

# The offline tasks shipped in recurrentgemma_tpu/downstream/tasks (the tag runs all three).
LOCAL_TASKS = ("rg_stdlib_next_line", "rg_stdlib_complete", "rg_stdlib_ppl")
LOCAL_TAG = "rg_stdlib"


def split_tasks(tasks: str) -> tuple[str, ...]:
  """'a, b,,c' -> ('a', 'b', 'c')."""
  return tuple(t.strip() for t in tasks.split(",") if t.strip())


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Typed `config.eval` (configs/base.py declares and explains each field)."""

  every: int
  tasks: str
  limit: int
  num_fewshot: int
  batch_size: int
  max_length: int
  add_bos: bool
  shared_context: bool

  def __post_init__(self):
    if self.every < 0:
      raise ValueError(f"config.eval.every={self.every} must be >= 0 (0: no downstream evaluation "
                       "during training).")
    if self.every and not self.task_names:
      raise ValueError(f"config.eval.every={self.every} needs config.eval.tasks (comma-separated "
                       f"lm-eval task names, e.g. {LOCAL_TAG!r}, the offline tasks).")
    if self.limit < 0:
      raise ValueError(f"config.eval.limit={self.limit} must be >= 0 (0: every document).")
    if self.num_fewshot < -1:
      raise ValueError(f"config.eval.num_fewshot={self.num_fewshot} must be >= 0, or -1 for each "
                       "task's own default.")
    if self.batch_size < 1:
      raise ValueError(f"config.eval.batch_size={self.batch_size} must be >= 1.")
    if self.max_length != 0 and self.max_length < 2:
      raise ValueError(f"config.eval.max_length={self.max_length} must be >= 2 (0: data.seq_len).")

  @property
  def task_names(self) -> tuple[str, ...]:
    return split_tasks(self.tasks)


def require_lm_eval() -> None:
  """Raises ValueError (a user error) when lm-eval-harness is not installed."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec("lm_eval") is None:
    raise ValueError("downstream evaluation needs lm-eval-harness: pip install "
                     "'recurrentgemma_tpu[eval]' (or pip install lm-eval).")
