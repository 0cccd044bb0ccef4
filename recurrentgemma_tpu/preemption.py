"""SIGTERM handling for the whole life of a training process.

`install()` runs first thing in `train.py`, before its heavy imports. From then on a SIGTERM:
* before `train.py` is ready to catch exceptions (imports, flag parsing) exits at once with 42;
* outside the training loop (imports, data preparation, restore, compile, final evaluation) raises
  `Preempted` at once: nothing is saved, `train.py` prints one line and exits 42;
* inside the loop (`with deferred() as watch:`) only sets a flag; the loop asks `watch.reached(step)`
  at every step boundary, saves that step, and the job exits 42.

`Preempted` derives from BaseException, like KeyboardInterrupt, so a broad `except Exception` on the
way (e.g. a storage retry) can neither swallow it nor mistake it for a failure.

A launcher that starts the trainer (launch/'s local backend, a sweep driver) sets
`PARENT_PID_ENV` to its own pid: `install()` then asks the kernel for a SIGTERM when that parent
dies, even by SIGKILL, so an orphaned trainer takes the same path (saves at the next step boundary,
exits 42) instead of training on unwatched or being lost with its unsaved steps.

Several processes: `jax.distributed.initialize` starts JAX's preemption service, whose native handler
takes over SIGTERM on every host; inside the loop `reached` then asks
`multihost_utils.reached_preemption_sync_point(step)`, which makes all hosts save the same step.
Outside the loop such a job is stopped by the launcher's kill after its grace period.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from typing import Iterator, Mapping

from recurrentgemma_tpu import exit_codes

PARENT_PID_ENV = "RECURRENTGEMMA_TPU_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PARENT_POLL_S = 1.0  # where prctl is missing (not Linux): how often the parent pid is checked


class Preempted(BaseException):
  """SIGTERM arrived outside the training loop (nothing was saved), or the loop saved and stopped."""

  exit_code = exit_codes.PREEMPTED
  traceback = False


class _State:
  installed = False
  catching = False  # the entry point catches Preempted from here on
  deferring = False
  requested = threading.Event()
  raised = False


def install() -> None:
  """Installs the SIGTERM handler (main thread only; a no-op elsewhere or when called again)."""
  if _State.installed or threading.current_thread() is not threading.main_thread():
    return
  signal.signal(signal.SIGTERM, _on_sigterm)
  _State.installed = True
  follow_parent()


def set_parent_death_signal(sig: int) -> bool:
  """Asks the kernel to send `sig` to this process when its parent dies; False where it cannot."""
  try:
    return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig)) == 0
  except (OSError, AttributeError):
    return False


def follow_parent(env: Mapping[str, str] | None = None) -> None:
  """SIGTERM to this process once the launcher named in PARENT_PID_ENV is gone (no-op without it)."""
  env = os.environ if env is None else env
  parent = int(env.get(PARENT_PID_ENV) or 0)
  if not parent:
    return
  if not set_parent_death_signal(signal.SIGTERM):
    def poll() -> None:
      while os.getppid() == parent:
        time.sleep(_PARENT_POLL_S)
      os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=poll, name="follow-parent", daemon=True).start()
  elif os.getppid() != parent:  # it died before the kernel was asked
    os.kill(os.getpid(), signal.SIGTERM)


def catch() -> None:
  """Called by the entry point once it catches `Preempted` (until then a SIGTERM exits directly)."""
  _State.catching = True


def _on_sigterm(signum, frame) -> None:  # pylint: disable=unused-argument
  _State.requested.set()
  if _State.deferring:
    print("SIGTERM received: saving a checkpoint at the next step boundary, then exiting.",
          file=sys.stderr, flush=True)
    return
  if _State.raised:  # already unwinding from the first one
    return
  if not _State.catching:
    print("SIGTERM received during start-up: exiting without saving.", file=sys.stderr, flush=True)
    os._exit(exit_codes.PREEMPTED)  # pylint: disable=protected-access
  _State.raised = True
  raise Preempted("SIGTERM received outside the training loop; nothing was saved.")


def requested() -> bool:
  """True once a SIGTERM has arrived (in this process)."""
  return _State.requested.is_set()


class Watch:
  """What the loop asks at every step boundary (see `deferred`)."""

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self._multiprocess = jax.process_count() > 1

  def reached(self, step: int) -> bool:
    """True when training should save after `step` and stop (call at every step, on every host)."""
    if self._multiprocess:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return _State.requested.is_set()


@contextlib.contextmanager
def deferred() -> Iterator[Watch]:
  """Inside, a SIGTERM only sets the flag that `Watch.reached` reports (and `requested()`)."""
  install()
  _State.deferring = True
  try:
    yield Watch()
  finally:
    _State.deferring = False
