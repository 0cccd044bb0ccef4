"""SIGTERM handling for the whole life of a training process.

`install()` runs first thing in `train.py`, before its heavy imports. From then on a SIGTERM:
* before `train.py` is ready to catch exceptions (imports, flag parsing) exits at once with 42;
* outside the training loop (imports, data preparation, restore, compile, final evaluation) raises
  `Preempted` at once: nothing is saved, `train.py` prints one line and exits 42;
* inside the loop (`with deferred() as watch:`) only sets a flag; the loop asks `watch.reached(step)`
  at every step boundary, saves that step, and the job exits 42.

`Preempted` derives from BaseException, like KeyboardInterrupt, so a broad `except Exception` on the
way (e.g. a storage retry) can neither swallow it nor mistake it for a failure.

Several processes: `jax.distributed.initialize` starts JAX's preemption service, whose native handler
takes over SIGTERM on every host; inside the loop `reached` then asks
`multihost_utils.reached_preemption_sync_point(step)`, which makes all hosts save the same step.
Outside the loop such a job is stopped by the launcher's kill after its grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

EXIT_CODE = 42  # exit_codes.PREEMPTED (not imported: this module loads before anything heavy)


class Preempted(BaseException):
  """SIGTERM arrived outside the training loop (nothing was saved), or the loop saved and stopped."""


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
    os._exit(EXIT_CODE)  # pylint: disable=protected-access
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
