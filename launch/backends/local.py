"""The local backend: N processes on this machine, joined by jax.distributed (gloo on CPU), each with
the environment a pod host gets. It babysits them like a pod: a process that dies or hangs restarts
the whole job (the trainer resumes from its newest checkpoint), within separate budgets for
preemptions (exit 42) and failures.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable

from launch import commands
from launch import spec as spec_lib
from launch import state as state_lib

LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"
_GRACE_S = 30  # after SIGTERM (stop, or the launcher itself terminated), before SIGKILL


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_time(pid: int) -> str | None:
  """The kernel's start time of `pid` (to tell our process from a reused pid), None if gone."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def live_pids(st: state_lib.RunState) -> list[int]:
  """This run's recorded processes that still run (pid and kernel start time both match)."""
  started = [e for e in st.history if e["event"] == "started"]
  starts = started[-1].get("starts", {}) if started else {}
  return [pid for pid in st.pids
          if starts.get(str(pid)) is not None and _start_time(pid) == starts[str(pid)]]


def host_hygiene(st: state_lib.RunState, log: Callable[[str], None]) -> None:
  """Kills processes of this run left from an earlier launcher, removes libtpu's lock file."""
  for pid in live_pids(st):
    log(f"host hygiene: killing stale process {pid} of this run")
    try:
      os.killpg(pid, signal.SIGKILL)
    except OSError:
      pass
  if os.path.exists(LIBTPU_LOCKFILE):
    try:
      os.remove(LIBTPU_LOCKFILE)
      log(f"host hygiene: removed {LIBTPU_LOCKFILE}")
    except OSError as e:
      log(f"host hygiene: cannot remove {LIBTPU_LOCKFILE}: {e}")


def _kill_all(procs: list[subprocess.Popen], sig: int) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, sig)  # each process leads its own group: children go too
      except OSError:
        pass
  if sig == signal.SIGKILL:
    for p in procs:
      p.wait()


def _terminate(procs: list[subprocess.Popen]) -> None:
  _kill_all(procs, signal.SIGTERM)
  deadline = time.time() + _GRACE_S
  while time.time() < deadline and any(p.poll() is None for p in procs):
    time.sleep(0.2)
  _kill_all(procs, signal.SIGKILL)


class _Terminated(Exception):
  pass


def run(spec: spec_lib.JobSpec, *, python: str = sys.executable, poll_s: float = 0.5,
        log: Callable[[str], None] = print) -> int:
  """Runs the job to the end; returns the launcher's exit code (0 done, 42 stopped/preempted out of
  budget, 2/3 the trainer's fatal codes, 1 otherwise)."""
  wd, b = spec.workdir, spec.budgets
  st = state_lib.load_state(wd)
  host_hygiene(st, log)
  os.makedirs(state_lib.join(wd, "logs"), exist_ok=True)

  def on_sigterm(signum, frame):  # the launcher itself is being stopped (a sweep, a pod, Ctrl-C)
    raise _Terminated()

  previous = signal.signal(signal.SIGTERM, on_sigterm)
  procs: list[subprocess.Popen] = []
  try:
    while True:
      if state_lib.stop_requested(wd):
        st.phase, st.message = "stopped", "stop requested"
        st.event("stopped")
        state_lib.save_state(wd, st)
        return commands.EXIT_PREEMPTED
      st.attempt += 1
      port = _free_port()
      argv = commands.train_argv(spec, python=python)
      procs, logs = [], []
      for i in range(spec.num_processes):
        env = {**os.environ, **commands.host_env(spec, i, "localhost", port)}
        f = open(state_lib.log_path(wd, i), "ab")
        f.write(f"\n===== rg-launch attempt {st.attempt} process {i} {time.ctime()} =====\n".encode())
        f.flush()
        logs.append(f)
        procs.append(subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True))
      started = time.time()
      st.phase, st.pids, st.attempt_started = "running", [p.pid for p in procs], started
      st.event("started", attempt=st.attempt, pids=st.pids,
               starts={str(p.pid): _start_time(p.pid) for p in procs})
      state_lib.save_state(wd, st)
      log(f"attempt {st.attempt}: {spec.num_processes} process(es) {st.pids}, logs in "
          f"{state_lib.join(wd, 'logs')}")
      outcome = _watch(spec, procs, started, poll_s)
      for f in logs:
        f.close()
      kind, detail, rc = outcome
      st.pids = []
      st.event(kind, attempt=st.attempt, detail=detail)
      log(f"attempt {st.attempt}: {kind}: {detail}")
      if kind == "done":
        st.phase, st.message = "done", detail
        state_lib.save_state(wd, st)
        return commands.EXIT_DONE
      if state_lib.stop_requested(wd):
        continue  # stopped by launch.stop: not a preemption; the loop's top records it
      if kind == "fatal":
        st.phase, st.message = "failed", detail
        state_lib.save_state(wd, st)
        return rc
      if kind == "preempted":
        st.preemptions += 1
        over = st.preemptions > b.max_preemptions
      else:
        st.failures += 1
        over = st.failures > b.max_failures
      if over:
        st.phase = "failed"
        st.message = (f"{kind} {st.preemptions if kind == 'preempted' else st.failures} times, over "
                      f"the budget ({b.max_preemptions if kind == 'preempted' else b.max_failures})")
        state_lib.save_state(wd, st)
        log(st.message)
        return commands.EXIT_PREEMPTED if kind == "preempted" else commands.EXIT_INTERNAL
      st.phase = "restarting"
      state_lib.save_state(wd, st)
  except (_Terminated, KeyboardInterrupt):
    log("launcher terminated: SIGTERM to the job (the trainer saves at its next step, exits 42)")
    _terminate(procs)
    codes = [p.returncode for p in procs]
    log(f"job stopped: exit codes {codes}" + ("" if all(c == commands.EXIT_PREEMPTED for c in codes)
                                             else " (not all saved: the run resumes from its "
                                                  "newest checkpoint)"))
    st.phase, st.pids, st.message = "stopped", [], "launcher terminated"
    st.event("stopped")
    state_lib.save_state(wd, st)
    return commands.EXIT_PREEMPTED
  finally:
    signal.signal(signal.SIGTERM, previous)


def _watch(spec: spec_lib.JobSpec, procs: list[subprocess.Popen], started: float,
           poll_s: float) -> tuple[str, str, int]:
  """Waits for the attempt to end. Returns (kind, detail, exit code for the launcher), kind in
  done|preempted|failed|fatal."""
  b, wd = spec.budgets, spec.workdir
  while True:
    time.sleep(poll_s)
    rcs = [p.poll() for p in procs]
    if all(rc == 0 for rc in rcs):
      return "done", "every process exited 0", commands.EXIT_DONE
    bad = [(i, rc) for i, rc in enumerate(rcs) if rc not in (None, 0)]
    if bad:
      # One process down: the others are stuck in collectives; stop them all now.
      _kill_all(procs, signal.SIGKILL)
      i, rc = bad[0]
      if rc == commands.EXIT_PREEMPTED and all(r in (None, 0, commands.EXIT_PREEMPTED) for _, r in bad):
        return "preempted", f"process {i} exit {rc}", rc
      if rc in commands.FATAL_EXITS:
        return "fatal", f"process {i} exit {rc}", rc
      what = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
      return "failed", f"process {i} {what}", commands.EXIT_INTERNAL
    if state_lib.stop_requested(wd):
      _terminate(procs)
      return "preempted", "stop requested", commands.EXIT_PREEMPTED
    now = time.time()
    if b.run_timeout_s and now - started > b.run_timeout_s:
      _kill_all(procs, signal.SIGKILL)
      return "fatal", f"run timeout {b.run_timeout_s:.0f}s", commands.EXIT_INTERNAL
    for i, p in enumerate(procs):
      if rcs[i] is not None:
        continue
      why = state_lib.hang_verdict(
          state_lib.read_heartbeat(wd, i), now=now, started=started,
          startup_timeout_s=b.startup_timeout_s, hang_factor=b.hang_factor,
          min_hang_s=b.min_hang_s, pid=p.pid)
      if why:
        # SIGKILL: a stopped (SIGSTOP) or wedged process cannot act on SIGTERM.
        _kill_all(procs, signal.SIGKILL)
        return "failed", f"process {i} hung: {why}", commands.EXIT_INTERNAL
