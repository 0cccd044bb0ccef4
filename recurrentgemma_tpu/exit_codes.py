"""Exit codes: the one table shared by the trainer, the launcher and the sweeps.

    0  run complete (also: the workdir was already complete)
    1  internal error (a bug, a failed save, storage that keeps failing): look at the log
    2  user error (bad flag, config or path, refused resume), reported before any compile
    3  stopped on a NaN/Inf loss or gradient norm (the last good checkpoint is kept)
    4  the launcher's fit check: the plan does not fit the target (nothing was started)
    42 stopped by SIGTERM / preemption (after saving, when inside the training loop): run it again

Codes 2, 3 and 4 are fatal: running the same job again reproduces them bit for bit, so no launcher,
backend or sweep ever retries them. Each exception that ends a job carries its code as the class
attribute `exit_code` (and `traceback = False` when its message says everything), so this module
imports nothing and everything may import it.
"""

from __future__ import annotations

OK = 0
INTERNAL = 1
USER_ERROR = 2
NON_FINITE = 3
NO_FIT = 4
PREEMPTED = 42

FATAL = frozenset({USER_ERROR, NON_FINITE, NO_FIT})

_NAMES = {OK: "complete", INTERNAL: "internal error", USER_ERROR: "user error",
          NON_FINITE: "stopped on a non-finite loss", NO_FIT: "does not fit the target",
          PREEMPTED: "preempted (saved; run it again)"}


def describe(code: int | None) -> str:
  """`code` in words, e.g. "exit 3 (stopped on a non-finite loss)"; a signal death as such."""
  if code is None:
    return "no exit code"
  if code < 0:
    return f"killed by signal {-code}"
  return f"exit {code}" + (f" ({_NAMES[code]})" if code in _NAMES else "")


class UserError(ValueError):
  """A problem the user fixes in a flag, the config or a path; reported in one line, exit 2."""

  exit_code = USER_ERROR
  traceback = False


def message(error: BaseException) -> str:
  """The error's message in one line; for a message that quotes a traceback (ml_collections wraps a
  config file's own error in one), the traceback's last line, which names what was wrong."""
  text = str(error)
  if "Traceback (most recent call last)" in text:
    text = [line for line in text.splitlines() if line.strip()][-1]
  return " ".join(text.split())


def for_exception(error: BaseException) -> int:
  """The exit code for an exception that ended the job: its class's `exit_code`, else INTERNAL."""
  return getattr(error, "exit_code", INTERNAL)


def wants_traceback(error: BaseException) -> bool:
  """Only unexpected internal errors print a traceback; a class with `traceback = False` is one line."""
  return getattr(error, "traceback", for_exception(error) == INTERNAL)
