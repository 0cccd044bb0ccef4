"""Which lm-eval tasks exist: lm-eval's registry plus the offline tasks shipped in `tasks/`.

Imports lm-eval but nothing of the training code, so `experiment.build` can check `config.eval.tasks`.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Sequence

from lm_eval.tasks import TaskManager

from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu.downstream import config as config_lib

TASK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


def task_manager(names: Sequence[str] = ()) -> Any:
  """An lm-eval TaskManager with the offline tasks; lm-eval's own registry only when `names`
  need it (indexing its ~15k task files takes seconds)."""
  local = set(config_lib.LOCAL_TASKS) | {config_lib.LOCAL_TAG}
  return TaskManager(include_path=TASK_DIR, include_defaults=not set(names) <= local)


def check_tasks(names: Sequence[str], manager: Any = None) -> Any:
  """Raises UserError naming any task (or group or tag) lm-eval does not know; returns the manager."""
  if not names:
    raise exit_codes.UserError(f"no tasks given; name lm-eval tasks, e.g. --tasks={config_lib.LOCAL_TAG} "
                               f"(the offline tasks {', '.join(config_lib.LOCAL_TASKS)}).")
  manager = manager or task_manager(names)
  known = set(manager.all_tasks)
  unknown = [n for n in names if n not in known]
  if unknown:
    hints = [f"{n!r} (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(n, known, 1)) else
             repr(n) for n in unknown]
    raise exit_codes.UserError(
        f"unknown lm-eval task {', '.join(hints)}: give task, group or tag names lm-eval lists "
        f"(`lm-eval ls tasks`), or the offline ones: {config_lib.LOCAL_TAG}, "
        f"{', '.join(config_lib.LOCAL_TASKS)}.")
  return manager
