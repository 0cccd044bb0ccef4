"""The local backend (one face with the others: run, stop, gc, describe): N processes on this machine, joined by jax.distributed (gloo on CPU), each with
the environment a pod host gets. It babysits them like a pod: a process that dies or hangs restarts
the whole job (the trainer resumes from its newest checkpoint); launch/supervisor.py decides what an
exit means and whether the budgets allow another attempt.

Each trainer process follows this launcher (preemption.PARENT_PID_ENV): if the launcher dies, even
by SIGKILL, the kernel sends the trainer SIGTERM, and it saves at its next step boundary and exits 42.
A re-run first waits for such leftovers to finish saving (`host_hygiene`) and then resumes after
their last saved step.
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
from launch import progress as progress_lib
from launch import spec as spec_lib
from launch import state as state_lib
from launch import supervisor
from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import heartbeat
from recurrentgemma_tpu import preemption
from recurrentgemma_tpu import workdir as workdir_lib

LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"
# After SIGTERM (stop, the launcher itself terminated, a leftover of a killed launcher), before
# SIGKILL: long enough for a trainer to finish its step and save a checkpoint on a busy machine.
GRACE_S = 180


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_time(pid: int) -> str | None:
  """The kernel's start time of `pid` (to tell our process from a reused pid), None if gone."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None
  if len(fields) < 20 or fields[0] == "Z":  # a zombie has exited: gone
    return None
  return fields[19]


def live_pids(st: state_lib.RunState) -> list[int]:
  """This run's recorded processes that still run (pid and kernel start time both match)."""
  started = [e for e in st.history if e["event"] == "started"]
  starts = started[-1].get("starts", {}) if started else {}
  return [pid for pid in st.pids
          if starts.get(str(pid)) is not None and _start_time(pid) == starts[str(pid)]]


def host_hygiene(st: state_lib.RunState, log: Callable[[str], None], grace_s: float = GRACE_S) -> None:
  """Stops processes of this run left from an earlier launcher, removes libtpu's lock file.

  Such a leftover got SIGTERM when its launcher died and may be saving its newest step: it gets
  `grace_s` to finish (and another SIGTERM, in case it never got the first) before SIGKILL.
  """
  stale = live_pids(st)
  for pid in stale:
    log(f"host hygiene: stopping stale process {pid} of this run (SIGTERM, up to {grace_s:.0f}s to "
        "save)")
    try:
      os.killpg(pid, signal.SIGTERM)
    except OSError:
      pass
  deadline = time.time() + grace_s
  starts = {pid: _start_time(pid) for pid in stale}
  while time.time() < deadline and any(_start_time(p) == starts[p] for p in stale):
    time.sleep(0.2)
  for pid in stale:
    if _start_time(pid) == starts[pid]:
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
  deadline = time.time() + GRACE_S
  while time.time() < deadline and any(p.poll() is None for p in procs):
    time.sleep(0.2)
  _kill_all(procs, signal.SIGKILL)


class _Terminated(Exception):
  pass


def describe(spec: spec_lib.JobSpec, runner, log: Callable[[str], None]) -> None:  # pylint: disable=unused-argument
  """What --dry_run prints beyond each host's command: where the logs go."""
  log(f"# logs: {state_lib.log_path(spec.workdir, 0).replace('process_0', 'process_<i>')} "
      "(port chosen at start)")


def stop(spec: spec_lib.JobSpec, st: state_lib.RunState, runner, log: Callable[[str], None]) -> None:
  """SIGTERM to the run's live processes (they save and exit 42); `runner.dry_run` only prints."""
  del spec
  for pid in live_pids(st):
    log(f"SIGTERM to process group {pid}")
    if not runner.dry_run:
      os.killpg(pid, signal.SIGTERM)


def gc(spec: spec_lib.JobSpec, st: state_lib.RunState, runner, lister,  # pylint: disable=unused-argument
       log: Callable[[str], None]) -> list[str]:  # pylint: disable=unused-argument
  """Nothing to collect: processes die with their launcher (their leftovers are stopped by `run`)."""
  return []


def run(spec: spec_lib.JobSpec, runner=None, *, python: str = sys.executable, poll_s: float = 0.5,
        log: Callable[[str], None] = print, progress: progress_lib.Reporter | None = None) -> int:
  """Runs the job to the end; returns the launcher's exit code (exit_codes: OK done, PREEMPTED
  stopped or preempted out of budget, the trainer's fatal code, INTERNAL failed out of budget).
  `progress` prints a line (step, loss, ETA, restarts) at its interval while the job runs."""
  wd, b = spec.workdir, spec.budgets
  st = state_lib.load_state(wd)
  host_hygiene(st, log)
  workdir_lib.makedirs(workdir_lib.join(wd, workdir_lib.LOGS_DIR))

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
        return exit_codes.PREEMPTED
      st.attempt += 1
      port = _free_port()
      argv = commands.train_argv(spec, python=python)
      procs, logs = [], []
      for i in range(spec.num_processes):
        env = {**os.environ, **commands.host_env(spec, i, "localhost", port),
               preemption.PARENT_PID_ENV: str(os.getpid())}
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
          f"{workdir_lib.join(wd, workdir_lib.LOGS_DIR)}")
      restarts = st.attempt - 1
      outcome = _watch(spec, procs, started, poll_s,
                       (lambda: progress.poll(restarts)) if progress else lambda: None)
      for f in logs:
        f.close()
      st.pids = []
      st.event(outcome.kind, attempt=st.attempt, detail=outcome.detail)
      log(f"attempt {st.attempt}: {outcome.kind}: {outcome.detail}")
      if outcome.kind == supervisor.DONE:
        st.phase, st.message = "done", outcome.detail
        state_lib.save_state(wd, st)
        return outcome.code
      if state_lib.stop_requested(wd):
        continue  # stopped by launch.stop: not a preemption; the loop's top records it
      give_up = supervisor.charge(st, outcome, b)
      if give_up:
        st.phase, st.message = "failed", give_up
        state_lib.save_state(wd, st)
        log(give_up)
        return outcome.code
      st.phase = "restarting"
      state_lib.save_state(wd, st)
  except (_Terminated, KeyboardInterrupt):
    # A second SIGTERM while the job is being stopped (a parent's death signal after a sweep's
    # SIGTERM, say) asks for what is already under way: it must not cut the stop short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log("launcher terminated: SIGTERM to the job (the trainer saves at its next step, exits 42)")
    _terminate(procs)
    codes = [p.returncode for p in procs]
    log(f"job stopped: exit codes {codes}"
        + ("" if all(c == exit_codes.PREEMPTED for c in codes)
           else " (not all saved: the run resumes from its newest checkpoint)"))
    st.phase, st.pids, st.message = "stopped", [], "launcher terminated"
    st.event("stopped")
    state_lib.save_state(wd, st)
    return exit_codes.PREEMPTED
  finally:
    signal.signal(signal.SIGTERM, previous)


def _watch(spec: spec_lib.JobSpec, procs: list[subprocess.Popen], started: float,
           poll_s: float, report: Callable[[], object]) -> supervisor.Outcome:
  """Waits for the attempt to end (reporting progress at each look) and returns how it ended."""
  b, wd = spec.budgets, spec.workdir
  while True:
    time.sleep(poll_s)
    report()
    outcome = supervisor.classify([p.poll() for p in procs])
    if outcome is not None:
      # One process down: the others are stuck in collectives; stop them all now.
      _kill_all(procs, signal.SIGKILL)
      return outcome
    if state_lib.stop_requested(wd):
      _terminate(procs)
      return supervisor.preempted("stop requested")
    now = time.time()
    if b.run_timeout_s and now - started > b.run_timeout_s:
      _kill_all(procs, signal.SIGKILL)
      return supervisor.Outcome(supervisor.FATAL, f"run timeout {b.run_timeout_s:.0f}s",
                                exit_codes.INTERNAL)
    for i, p in enumerate(procs):
      if p.returncode is not None:
        continue
      why = supervisor.hang_verdict(heartbeat.read_record(wd, i), now=now, started=started,
                                    budgets=b, pid=p.pid)
      if why:
        # SIGKILL: a stopped (SIGSTOP) or wedged process cannot act on SIGTERM.
        _kill_all(procs, signal.SIGKILL)
        return supervisor.failed(f"process {i} hung: {why}")
