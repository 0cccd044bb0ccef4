"""The one restart policy of launch/: what an attempt's end means, whether to run it again, and
when a silent process counts as hung. Every backend and the sweep runner ask it; none keeps rules
of its own (they only do their provider's mechanics: start, watch, kill, recreate).

An attempt ends in one of four ways:
  done       every process exited 0: the run is complete
  fatal      a process exited 2, 3 or 4 (exit_codes.FATAL): a user error, a NaN stop or a plan that
             does not fit, which a re-run reproduces bit for bit; never retried, anywhere
  preempted  a process exited 42 (saved on SIGTERM), or the capacity went away (a lost VM)
  failed     anything else: another exit code, a death by signal, a hang
Preemptions and failures are charged to separate budgets (`spec.Budgets`): losing capacity is the
provider's business and is retried many times, real errors only a few.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from launch import spec as spec_lib
from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import heartbeat

DONE, FATAL, PREEMPTED, FAILED = "done", "fatal", "preempted", "failed"


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How an attempt ended: its kind, a line for people, and the exit code a launcher reports."""

  kind: str
  detail: str
  code: int


def classify(codes: Sequence[int | None]) -> Outcome | None:
  """The outcome of an attempt from each process's exit code (None: still running).

  None while nothing is decided yet (some still run, none failed). One fatal exit decides the
  attempt fatal, any other failure decides it failed, then a 42 preempted; only all zeros are done.
  """
  ended = [(i, c) for i, c in enumerate(codes) if c is not None]
  for i, c in ended:
    if c in exit_codes.FATAL:
      return Outcome(FATAL, f"process {i} {exit_codes.describe(c)}", c)
  for i, c in ended:
    if c not in (exit_codes.OK, exit_codes.PREEMPTED):
      return Outcome(FAILED, f"process {i} {exit_codes.describe(c)}", exit_codes.INTERNAL)
  for i, c in ended:
    if c == exit_codes.PREEMPTED:
      return Outcome(PREEMPTED, f"process {i} {exit_codes.describe(c)}", exit_codes.PREEMPTED)
  if codes and len(ended) == len(codes):
    return Outcome(DONE, "every process exited 0", exit_codes.OK)
  return None


def preempted(detail: str) -> Outcome:
  """Capacity lost without an exit code (a SUSPENDED queued resource, a stop request)."""
  return Outcome(PREEMPTED, detail, exit_codes.PREEMPTED)


def failed(detail: str) -> Outcome:
  """A failure seen from outside (a hang, a deadline)."""
  return Outcome(FAILED, detail, exit_codes.INTERNAL)


def charge(ledger, outcome: Outcome, budgets: spec_lib.Budgets) -> str | None:
  """Counts a preempted or failed attempt on `ledger` (anything with `preemptions` and `failures`).

  Returns why the job gives up (a fatal outcome, or a budget spent), or None: run it again.
  """
  if outcome.kind == FATAL:
    return f"{outcome.detail}: retrying cannot help"
  if outcome.kind == PREEMPTED:
    ledger.preemptions += 1
    if ledger.preemptions > budgets.max_preemptions:
      return (f"{outcome.detail}; preempted {ledger.preemptions} times, over the budget "
              f"({budgets.max_preemptions})")
  elif outcome.kind == FAILED:
    ledger.failures += 1
    if ledger.failures > budgets.max_failures:
      return (f"{outcome.detail}; failed {ledger.failures} times, over the budget "
              f"({budgets.max_failures})")
  else:
    raise ValueError(f"outcome {outcome.kind!r} is not charged (it ends the job)")
  return None


def hang_verdict(beat: heartbeat.Record | None, *, now: float, started: float,
                 budgets: spec_lib.Budgets, pid: int | None = None) -> str | None:
  """Why a process counts as hung, or None while it looks alive.

  No heartbeat yet (or only one from an earlier attempt or process) means "starting": allowed until
  `startup_timeout_s` after the attempt started; the same deadline holds while starting or compiling.
  Once training, no new heartbeat for max(min_hang_s, hang_factor x step_time) means hung; while
  evaluating or saving (no step boundaries inside), at least `startup_timeout_s`.
  """
  b = budgets
  fresh = beat is not None and beat.time >= started - 1 and (pid is None or beat.pid == pid)
  if not fresh or beat.phase in ("starting", "compiling"):
    if b.startup_timeout_s and now - started > b.startup_timeout_s:
      what = "no heartbeat" if not fresh else f"still {beat.phase}"
      return f"{what} {now - started:.0f}s after start (startup timeout {b.startup_timeout_s:.0f}s)"
    return None
  if beat.phase == "done":
    return None
  limit = max(b.min_hang_s, b.hang_factor * (beat.step_time or 0.0))
  if beat.phase in ("evaluating", "saving"):
    # One long operation with no step boundary inside: allowed as long as a start-up.
    limit = max(limit, b.startup_timeout_s)
  if now - beat.time > limit:
    return (f"no heartbeat for {now - beat.time:.0f}s at step {beat.step} (phase {beat.phase}; "
            f"limit {limit:.0f}s = max({b.min_hang_s:.0f}, {b.hang_factor:g} x step time "
            f"{beat.step_time}))")
  return None
