"""A sweep's state, kept in files under its root so any number of drivers can share it.

    ROOT/trials/ID/                 the trial's workdir (the trainer's checkpoints, metrics.jsonl, ...)
    ROOT/state/ID/trial.json        the resolved trial (spec, overrides, variables, derived numbers)
    ROOT/state/ID/claim.N.json      lease N on the trial, created atomically (only one driver wins N)
    ROOT/state/ID/heartbeat.N.json  the holder's heartbeat for lease N ({"time", "released", ...})
    ROOT/state/ID/attempt.N.json    how lease N ended: done | failed | fatal | interrupted (+ rc,
                                    times, error)
    ROOT/state/ID/done.json         written once when the trial completed
    ROOT/state/ID/target.json       pod backends: the TPU target chosen for it (targets.py)
    ROOT/predictions.jsonl-like     predictions/*.json (fit --predict)

A lease is live while its heartbeat is fresh (younger than the TTL) and not released; a lease
whose driver ran on this host and whose driver and trial processes are gone is dead at once. To
take a trial, a driver creates lease N+1 with an exclusive create; of two drivers racing for the
same trial exactly one succeeds. Renewing and stealing are compare-and-swaps on the heartbeat
(store.replace_if: GCS generation preconditions, or an flock locally): the holder renews from the
generation it last wrote, and a driver that finds lease N stale first closes it by swapping in a
released heartbeat at the generation it judged stale. Of a late renewal and a steal exactly one
wins, so the old holder learns at its next renewal that it lost the trial and stops its copy.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import time
from typing import Any

from launch.sweep import store
from recurrentgemma_tpu import heartbeat as heartbeat_lib
from recurrentgemma_tpu import workdir as workdir_lib

DEFAULT_TTL_S = 300.0
_CLAIM = re.compile(r"^claim\.(\d+)\.json$")

PENDING, RUNNING, DONE, FAILED, RETRY = "pending", "running", "done", "failed", "retry"
FATAL = "fatal"  # an attempt's outcome: the supervisor's fatal exit (2, 3, 4); never retried


@dataclasses.dataclass
class Ledger:
  """The supervisor's counts for one trial (launch/supervisor.py charges them)."""

  preemptions: int = 0
  failures: int = 0


def trial_dir(root: str, trial_id: str) -> str:
  return workdir_lib.join(root, "trials", trial_id)


def state_dir(root: str, trial_id: str) -> str:
  return workdir_lib.join(root, "state", trial_id)


def _path(root: str, trial_id: str, name: str) -> str:
  return workdir_lib.join(state_dir(root, trial_id), name)


def _pid_alive(pid: int | None) -> bool:
  if not pid:
    return False
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  # A zombie (exited, not yet reaped) counts as gone.
  try:
    with open(f"/proc/{int(pid)}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except OSError:
    return True


@dataclasses.dataclass
class TrialState:
  """What the files say about one trial."""

  state: str  # pending | running | done | failed | retry
  lease: int  # newest lease number (0: never claimed)
  live_lease: bool
  failures: int  # attempts that ended "failed"
  restarts: int  # attempts that ended "interrupted" plus in-run restarts (exit 42)
  wall_time: float  # seconds over all finished attempts
  owner: str  # "host:pid" of the newest lease
  attempts: list[dict[str, Any]]
  reason: str = ""  # why a failed trial failed (its last attempt's error)


def leases(root: str, trial_id: str) -> list[int]:
  names = workdir_lib.listdir(state_dir(root, trial_id))
  return sorted(int(m.group(1)) for m in map(_CLAIM.match, names) if m)


def lease_is_live(root: str, trial_id: str, n: int, ttl_s: float = DEFAULT_TTL_S,
                  beat: dict[str, Any] | None = None) -> bool:
  """Whether lease `n` is held; `beat` is its heartbeat if the caller has read it already."""
  claim = workdir_lib.read_json(_path(root, trial_id, f"claim.{n}.json"))
  if claim is None:
    # Created but not yet readable: the creator is writing it now.
    return True
  if beat is None:
    beat = workdir_lib.read_json(_path(root, trial_id, f"heartbeat.{n}.json")) or {}
  if beat.get("released"):
    return False
  if workdir_lib.exists(_path(root, trial_id, f"attempt.{n}.json")):
    return False
  last = max(float(claim.get("time", 0)), float(beat.get("time", 0)))
  if time.time() - last > ttl_s:
    return False
  if claim.get("host") == socket.gethostname():
    pids = [claim.get("pid"), beat.get("child_pid")]
    if not any(_pid_alive(p) for p in pids):
      return False
  return True


def read_state(root: str, trial_id: str, retries: int, ttl_s: float = DEFAULT_TTL_S) -> TrialState:
  """The trial's state from its files (see the module docstring)."""
  ns = leases(root, trial_id)
  attempts = []
  for n in ns:
    a = workdir_lib.read_json(_path(root, trial_id, f"attempt.{n}.json"))
    if a is not None:
      attempts.append(a)
  failures = sum(a.get("outcome") == "failed" for a in attempts)
  fatal = any(a.get("outcome") == FATAL for a in attempts)
  restarts = sum(int(a.get("restarts", 0)) + (a.get("outcome") == "interrupted") for a in attempts)
  wall = sum(float(a.get("end", 0)) - float(a.get("start", 0)) for a in attempts)
  n = ns[-1] if ns else 0
  live = bool(ns) and lease_is_live(root, trial_id, n, ttl_s)
  recorded = {int(a.get("lease", -1)) for a in attempts}
  for m in ns:
    if m in recorded or (m == n and live):
      continue
    # A lease whose driver died (killed) without recording how it ended: an interruption; its
    # time runs from the claim to the last heartbeat.
    restarts += 1
    claim_m = workdir_lib.read_json(_path(root, trial_id, f"claim.{m}.json")) or {}
    beat_m = workdir_lib.read_json(_path(root, trial_id, f"heartbeat.{m}.json")) or {}
    if claim_m and beat_m:
      wall += max(0.0, float(beat_m.get("time", 0)) - float(claim_m.get("time", 0)))
  owner = ""
  if n:
    claim = workdir_lib.read_json(_path(root, trial_id, f"claim.{n}.json")) or {}
    owner = f"{claim.get('host', '?')}:{claim.get('pid', '?')}"
  if workdir_lib.exists(_path(root, trial_id, "done.json")):
    s = DONE
  elif live:
    s = RUNNING
  elif failures > retries or fatal or _fits_nowhere(root, trial_id):
    s = FAILED
  elif attempts:
    s = RETRY
  else:
    s = PENDING
  reason = ""
  if s == FAILED:
    ended = [a for a in attempts if a.get("outcome") in ("failed", FATAL)]
    reason = (ended[-1].get("error") or f"exit {ended[-1].get('rc')}") if ended else "fits no target"
  return TrialState(s, n, live, failures, restarts, wall, owner, attempts, reason)


def _fits_nowhere(root: str, trial_id: str) -> bool:
  """targets.py planned this trial and no candidate target fits it."""
  choice = workdir_lib.read_json(_path(root, trial_id, "target.json"))
  return choice is not None and not choice.get("target")


def claim_lease(root: str, trial_id: str,
                ttl_s: float = DEFAULT_TTL_S) -> tuple[int, store.Generation] | None:
  """Takes a lease on the trial if none is live: (its number, its heartbeat's generation, for
  `renew`), or None if another driver holds the trial or won the race for it."""
  ns = leases(root, trial_id)
  n = ns[-1] if ns else 0
  me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
  if n:
    beat_path = _path(root, trial_id, f"heartbeat.{n}.json")
    beat, gen = store.read_json_gen(beat_path)
    if lease_is_live(root, trial_id, n, ttl_s, beat=beat or {}):
      return None
    if not (beat or {}).get("released"):
      # Close the stale lease at the generation we judged stale: if its holder renewed meanwhile,
      # this swap fails and the trial stays theirs; if it succeeds, their next renewal fails.
      closed = {**(beat or {}), "released": True, "closed_by": me}
      if store.replace_if(beat_path, closed, gen) is None:
        return None
  if not store.create_exclusive(_path(root, trial_id, f"claim.{n + 1}.json"), me):
    return None
  gen = renew(root, trial_id, n + 1, 0)
  if gen is None:
    return None
  if workdir_lib.exists(_path(root, trial_id, "done.json")):
    # Finished by another driver between our look and our claim.
    release(root, trial_id, n + 1)
    return None
  return n + 1, gen


def claim(root: str, trial_id: str, ttl_s: float = DEFAULT_TTL_S) -> int | None:
  """`claim_lease` without the generation: the lease number, or None."""
  lease = claim_lease(root, trial_id, ttl_s)
  return lease[0] if lease else None


def renew(root: str, trial_id: str, n: int, gen: store.Generation,
          child_pid: int | None = None) -> store.Generation | None:
  """The holder's heartbeat for lease `n`, swapped in at `gen` (0: the first one); the new
  generation, or None if the lease was closed by another driver (the trial is no longer ours)."""
  return store.replace_if(_path(root, trial_id, f"heartbeat.{n}.json"),
                          {"time": time.time(), "pid": os.getpid(), "child_pid": child_pid,
                           "released": False}, gen)


def heartbeat(root: str, trial_id: str, n: int, child_pid: int | None = None,
              released: bool = False) -> None:
  """Writes lease `n`'s heartbeat unconditionally (releasing it; see `renew` for the holder's)."""
  workdir_lib.write_json(_path(root, trial_id, f"heartbeat.{n}.json"),
                   {"time": time.time(), "pid": os.getpid(), "child_pid": child_pid,
                    "released": released})


def release(root: str, trial_id: str, n: int) -> None:
  heartbeat(root, trial_id, n, released=True)


def record_attempt(root: str, trial_id: str, n: int, outcome: str, **fields: Any) -> None:
  """Ends lease `n` with its outcome (done | failed | interrupted); `done` also marks the trial."""
  record = {"lease": n, "outcome": outcome, "host": socket.gethostname(), "pid": os.getpid(),
            **fields}
  workdir_lib.write_json(_path(root, trial_id, f"attempt.{n}.json"), record)
  if outcome == "done":
    store.create_exclusive(_path(root, trial_id, "done.json"), record)
  release(root, trial_id, n)


def write_trial(root: str, trial: Any) -> None:
  path = _path(root, trial.id, "trial.json")
  if not workdir_lib.exists(path):
    workdir_lib.write_json(path, trial.to_json())


def read_records(workdir: str) -> list[dict[str, Any]]:
  """The trainer's metrics.jsonl records (complete lines only), read through the store."""
  return workdir_lib.records(workdir_lib.read_text_if_exists(workdir_lib.join(workdir, workdir_lib.METRICS_FILE)))


def completed(workdir: str, steps: int) -> bool:
  """The trainer's "run complete" rule (workdir.is_complete) on the trial's metrics.jsonl."""
  return workdir_lib.is_complete(workdir_lib.read_text_if_exists(workdir_lib.join(workdir, workdir_lib.METRICS_FILE)),
                                 steps)


def progress(workdir: str) -> tuple[int, float | None]:
  """(step, seconds per step or None) of a running trial, from its heartbeat or its metrics."""
  beat = heartbeat_lib.parse(workdir_lib.read_text_if_exists(workdir_lib.join(workdir, workdir_lib.HEARTBEAT_DIR,
                                                    "process_0.json")))
  if beat is not None:
    return beat.step, beat.step_time
  train = [r for r in read_records(workdir) if r.get("split") == "train"]
  if not train:
    return 0, None
  return int(train[-1]["step"]), train[-1].get("step_time")
