"""The TPU VM backend (run, stop, gc, describe, like every backend): queued resources (one slice: --node-id; several: --node-count/--node-prefix)
whose startup script runs the job, and a babysitter that follows them from this machine.

The job runs without the babysitter: the startup script installs the wheel and runs the trainer on
every boot, so a repaired or recreated VM resumes by itself. The babysitter adds what the VMs cannot
do alone: a deadline for queueing (a queued resource that waits too long is deleted, never left to
be fulfilled hours later), a deadline for running, recreating the queued resource after a
preemption (SUSPENDED / FAILED / preempted), restarting in place after a host failure or hang, the
two retry budgets, and deleting the queued resource when the run ends.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Callable

from launch import bundle
from launch import commands
from launch import progress as progress_lib
from launch import gcloud
from launch import spec as spec_lib
from launch import state as state_lib
from launch import supervisor
from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import heartbeat
from recurrentgemma_tpu import workdir as workdir_lib

WAITING = ("ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING")
ACTIVE = "ACTIVE"
LOST = ("FAILED", "SUSPENDED", "SUSPENDING", "PREEMPTED")
GONE = "NOT_FOUND"


def qr_state(runner: gcloud.Runner, spec: spec_lib.JobSpec, name: str) -> str:
  """The queued resource's state string (NOT_FOUND when it does not exist)."""
  res = runner.run(commands.qr_describe(spec, name), check=False)
  if res.returncode != 0:
    if "NOT_FOUND" in res.stderr or "not found" in res.stderr.lower():
      return GONE
    raise gcloud.CommandError(f"describe {name} failed: {res.stderr.strip()[-1000:]}")
  d = json.loads(res.stdout)
  s = d.get("state", {})
  state = s.get("state", "") if isinstance(s, dict) else str(s)
  # A spot/preemptible slice taken back shows as SUSPENDED (or FAILED); some report it in the
  # state's detail instead.
  if state == ACTIVE and "preempt" in json.dumps(s).lower():
    return "PREEMPTED"
  return state or "UNKNOWN"


def create(runner: gcloud.Runner, spec: spec_lib.JobSpec, attempt: int, script: str) -> str:
  name = commands.resource_name(spec, attempt)
  with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
    f.write(script)
  try:
    runner.run(commands.qr_create(spec, attempt, f.name))
  finally:
    os.remove(f.name)
  return name


def delete(runner: gcloud.Runner, spec: spec_lib.JobSpec, name: str) -> None:
  res = runner.run(commands.qr_delete(spec, name), check=False)
  if res.returncode != 0 and "not found" not in res.stderr.lower():
    raise gcloud.CommandError(f"delete {name} failed: {res.stderr.strip()[-1000:]}")


def _host_exits(spec: spec_lib.JobSpec, since: float) -> dict[int, int]:
  """Exit codes reported by hosts since `since` (older records belong to earlier attempts)."""
  out = {}
  for i in range(spec.num_hosts):
    rec = state_lib.read_exit(spec.workdir, i)
    if rec and float(rec.get("time", 0)) >= since - 1:
      out[i] = int(rec["rc"])
  return out


def run(spec: spec_lib.JobSpec, runner: gcloud.Runner, *, log: Callable[[str], None] = print,
        progress: progress_lib.Reporter | None = None) -> int:
  """Ships the code, then creates and babysits the job's queued resource until the run ends."""
  return babysit(spec, runner, bundle.ship(runner, spec.workdir), log=log,
                 progress=progress)


def describe(spec: spec_lib.JobSpec, runner: gcloud.Runner, log: Callable[[str], None]) -> None:
  """Prints (through a dry-run runner) every command and the startup script `run` would use."""
  wheel = bundle.ship(runner, spec.workdir)
  runner.run(commands.qr_create(spec, 1, "startup.sh"))
  name = commands.resource_name(spec, 1)
  log(f"# then, every {spec.budgets.poll_s:.0f}s until the run ends:")
  runner.run(commands.qr_describe(spec, name))
  log("# at the end, on a queueing/running timeout, or after a preemption (then recreated as -2, ...):")
  runner.run(commands.qr_delete(spec, name))
  log("# on a host failure or hang, restart in place:")
  for node in commands.node_names(spec, 1):
    runner.run(commands.tpu_ssh(spec, node, commands.restart_in_place_command(spec.run_id)))
  log("# startup.sh")
  log(commands.startup_script(spec, wheel))


def stop(spec: spec_lib.JobSpec, st: state_lib.RunState, runner: gcloud.Runner,
         log: Callable[[str], None]) -> None:
  """Deletes the run's queued resource (the trainer gets SIGTERM as the VMs shut down)."""
  if st.resource:
    log(f"deleting queued resource {st.resource}")
    delete(runner, spec, st.resource)


def gc(spec: spec_lib.JobSpec, st: state_lib.RunState, runner: gcloud.Runner,
       lister: gcloud.Runner, log: Callable[[str], None]) -> list[str]:  # pylint: disable=unused-argument
  """Deletes the run's queued resources (by label) other than the live attempt's; their names."""
  keep = st.resource if st.phase not in state_lib.FINAL_PHASES else ""
  res = lister.run(commands.qr_list(spec.zone, spec.project, spec.run_id))
  deleted = []
  for qr in json.loads(res.stdout or "[]"):
    name = qr.get("name", "").rsplit("/", 1)[-1]
    if name and name != keep:
      delete(runner, spec, name)
      deleted.append(name)
  return deleted


def babysit(spec: spec_lib.JobSpec, runner: gcloud.Runner, wheel_url: str, *,
            log: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
            clock: Callable[[], float] = time.time,
            progress: progress_lib.Reporter | None = None) -> int:
  """Creates and babysits the job's queued resource until the run ends; returns the exit code."""
  wd, b = spec.workdir, spec.budgets
  st = state_lib.load_state(wd)
  script = commands.startup_script(spec, wheel_url)
  name = st.resource if st.phase in ("queued", "running", "restarting") else ""
  queued_since = running_since = clock()
  # Resuming the babysitting of a live attempt: exit records written meanwhile still count.
  attempt_since = st.attempt_started if name and st.attempt_started else clock()
  alive_since = clock()  # when the hosts started this attempt's job (ACTIVE, or a restart)

  def finish(phase: str, message: str, rc: int) -> int:
    if name:
      log(f"deleting queued resource {name}")
      delete(runner, spec, name)
      st.event("deleted", resource=name)
    st.phase, st.message, st.resource = phase, message, ""
    st.event(phase, detail=message)
    state_lib.save_state(wd, st)
    log(f"{phase}: {message}")
    return rc

  def new_attempt() -> None:
    nonlocal name, queued_since, attempt_since
    st.attempt += 1
    name = create(runner, spec, st.attempt, script)
    queued_since = attempt_since = st.attempt_started = clock()
    st.phase, st.resource = "queued", name
    st.event("created", resource=name, capacity=spec.capacity)
    state_lib.save_state(wd, st)
    log(f"attempt {st.attempt}: queued resource {name} ({spec.num_slices} x "
        f"{spec.target.accelerator_type}, {spec.capacity})")

  def charge(outcome: supervisor.Outcome) -> int | None:
    """Charges a preemption or failure; the exit code when the job gives up."""
    give_up = supervisor.charge(st, outcome, b)
    if give_up:
      return finish("failed", give_up, outcome.code)
    st.event(outcome.kind, detail=outcome.detail)
    log(f"{outcome.kind}: {outcome.detail} (preemptions {st.preemptions}/{b.max_preemptions}, "
        f"failures {st.failures}/{b.max_failures})")
    return None

  if not name:
    new_attempt()
  while True:
    if state_lib.stop_requested(wd):
      return finish("stopped", "stop requested", exit_codes.PREEMPTED)
    state = qr_state(runner, spec, name)
    now = clock()
    if state in WAITING:
      if b.queue_timeout_s and now - queued_since > b.queue_timeout_s:
        return finish("failed", f"{name} still {state} after the queueing deadline "
                      f"({b.queue_timeout_s:.0f}s)", exit_codes.INTERNAL)
    elif state == ACTIVE:
      if st.phase != "running":
        st.phase, running_since, alive_since = "running", now, now
        st.event("active", resource=name)
        state_lib.save_state(wd, st)
        log(f"{name} is ACTIVE; the hosts run the job (logs: {workdir_lib.join(wd, workdir_lib.LOGS_DIR)})")
      exits = _host_exits(spec, attempt_since)
      outcome = supervisor.classify([exits.get(i) for i in range(spec.num_hosts)])
      if outcome is not None and outcome.kind in (supervisor.DONE, supervisor.FATAL):
        return finish("done" if outcome.kind == supervisor.DONE else "failed", outcome.detail,
                      outcome.code)
      if outcome is None and b.run_timeout_s and now - running_since > b.run_timeout_s:
        return finish("failed", f"running longer than the deadline ({b.run_timeout_s:.0f}s)",
                      exit_codes.INTERNAL)
      if outcome is None:
        if progress is not None:
          progress.poll(st.preemptions + st.failures)
        beats = [heartbeat.read_record(wd, i) for i in range(spec.num_hosts)]
        if not any(beats):
          # No host has written any heartbeat: a trainer that cannot write them to this workdir
          # would otherwise be restarted forever. Hang detection starts with the first heartbeat.
          beats = []
        for i, beat in enumerate(beats):
          verdict = supervisor.hang_verdict(beat, now=now, started=alive_since, budgets=b)
          if verdict:
            outcome = supervisor.failed(f"process {i} hung: {verdict}")
            break
      if outcome is not None:
        rc = charge(outcome)
        if rc is not None:
          return rc
        # Restart in place: every worker re-runs the startup script (kills the old trainer first).
        for node in commands.node_names(spec, st.attempt):
          runner.run(commands.tpu_ssh(spec, node, commands.restart_in_place_command(spec.run_id)))
        attempt_since = alive_since = st.attempt_started = clock()
        st.phase = "restarting"
        st.event("restarted", resource=name)
        state_lib.save_state(wd, st)
        st.phase = "running"
    elif state in LOST or state == GONE:
      rc = charge(supervisor.preempted(f"{name} is {state}"))
      if rc is not None:
        return rc
      if state != GONE:
        delete(runner, spec, name)
        st.event("deleted", resource=name)
      new_attempt()
      continue
    elif state == "DELETING":
      pass
    else:
      log(f"{name}: unexpected state {state}; waiting")
    sleep(b.poll_s)

