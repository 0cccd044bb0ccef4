"""Exit codes of `python -m recurrentgemma_tpu.train`, the contract with the launcher and the sweeps.

    0  run complete (also: the workdir was already complete)
    1  internal error (a bug, a failed save, storage that keeps failing): look at the log
    2  user error (bad flag, config or path, refused resume), reported before any compile
    3  stopped on a NaN/Inf loss or gradient norm (the last good checkpoint is kept)
    42 stopped by SIGTERM / preemption (after saving, when inside the training loop): run it again
"""

from __future__ import annotations

OK = 0
INTERNAL = 1
USER_ERROR = 2
NON_FINITE = 3
PREEMPTED = 42


class UserError(ValueError):
  """A problem the user fixes in a flag, the config or a path; reported in one line, exit 2."""


def for_exception(error: BaseException) -> int:
  """The exit code for an exception that ended the job (imports are lazy: this runs at exit)."""
  from recurrentgemma_tpu import metrics, preemption  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu.checkpoints import manager  # pylint: disable=g-import-not-at-top
  if isinstance(error, preemption.Preempted):
    return PREEMPTED
  if isinstance(error, metrics.NonFiniteError):
    return NON_FINITE
  if isinstance(error, (UserError, manager.CheckpointMismatch)):
    return USER_ERROR
  return INTERNAL


def wants_traceback(error: BaseException) -> bool:
  """Only unexpected internal errors print a traceback; storage failures are one clear line."""
  from recurrentgemma_tpu.checkpoints import manager  # pylint: disable=g-import-not-at-top
  return (for_exception(error) == INTERNAL
          and not isinstance(error, (manager.SaveFailed, manager.StorageError)))
