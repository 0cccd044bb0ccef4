"""What the CLIs do (submit, status, logs, stop, gc), as importable functions.

Every backend module has one face, `run`, `stop`, `gc` and `describe` (launch/backends/); this module
picks the backend once (`BACKENDS`) and never branches on it again.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Callable

from launch import commands
from launch import cost as cost_lib
from launch import gcloud
from launch import progress as progress_lib
from launch import spec as spec_lib
from launch import state as state_lib
from launch.backends import gke
from launch.backends import local
from launch.backends import tpu_vm
from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import heartbeat
from recurrentgemma_tpu import workdir as workdir_lib

if TYPE_CHECKING:
  from launch import preflight as preflight_lib

Log = Callable[[str], None]
BACKENDS = {"local": local, "tpu_vm": tpu_vm, "gke": gke}


def _err(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------ submit


def _local_devices_per_process() -> int:
  m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  return int(m.group(1)) if m else 1


def _preflight(spec: spec_lib.JobSpec, skip_fit_check: bool,
               log: Log) -> tuple[int, str, float | None, preflight_lib.FitCheck | None]:
  """(exit code or 0, fingerprint, predicted step seconds or None, the fit check or None). Cloud
  jobs always validate; the fit check (which predicts the step time) only for them."""
  from launch import preflight  # pylint: disable=g-import-not-at-top
  if spec.backend == "local" and skip_fit_check:
    return exit_codes.OK, "", None, None  # the trainer validates at start and exits 2 (not retried)
  try:
    if spec.backend == "local":
      from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
      config = experiment_lib.load_config(spec.config, spec.overrides)
      n = spec.num_processes * _local_devices_per_process()
      return exit_codes.OK, experiment_lib.build(config, num_devices=n).fingerprint(), None, None
    fp = preflight.fingerprint(spec)
    preflight.store_check(spec)  # a missing or mismatched data store: refused before any pod
    if skip_fit_check:
      return exit_codes.OK, fp, None, None
    fit = preflight.fit_check(spec, fp, log=log)  # streams the compile's lines as they come
  except (ValueError, FileNotFoundError) as e:
    _err(f"invalid job: {exit_codes.message(e)}")
    return exit_codes.USER_ERROR, "", None, None
  if fit.cached:
    log(fit.report + "\n(fit check cached)")
  if not fit.fits:
    _err(f"the plan does not fit {spec.target.accelerator_type} x {spec.num_slices}; see the report "
         "above (python -m recurrentgemma_tpu.compile --search finds plans that do)")
    return exit_codes.NO_FIT, fp, fit.step_s, fit
  return exit_codes.OK, fp, fit.step_s, fit


def _train_steps(spec: spec_lib.JobSpec) -> int | None:
  from launch import preflight  # pylint: disable=g-import-not-at-top
  try:
    return preflight.train_steps(spec)
  except (ValueError, FileNotFoundError, AttributeError):
    return None  # local without a fit check: the trainer reports the config's error itself


def plan_summary(spec: spec_lib.JobSpec, steps: int | None, step_s: float | None,
                 prices: cost_lib.PriceTable | None) -> str:
  """The short plan a submit opens with: slices, chips, hosts, step time, steps, duration, cost."""
  rows = cost_lib.plan_rows(spec, steps, step_s, prices)
  width = max(len(k) for k, _ in rows)
  return "\n".join(["# plan"] + [f"{k + ':':<{width + 1}} {v}" for k, v in rows])


def describe_plan(spec: spec_lib.JobSpec, log: Log) -> None:
  """Prints, for --dry_run, everything the submit would do (argv shell-quoted, one per line)."""
  runner = gcloud.Runner(dry_run=True, log=log)
  log("# job spec")
  log(spec.to_json())
  log("# each host's environment and command")
  for i in range(spec.num_hosts):
    where = "localhost" if spec.backend == "local" else "<slice 0 worker 0>"
    env = commands.host_env(spec, i, where, 0 if spec.backend == "local" else
                            commands.COORDINATOR_PORT)
    log(f"# process {i}")
    for k, v in env.items():
      log(f"{k}={v}")
    log(commands.quote(commands.train_argv(spec, python=sys.executable if spec.backend == "local"
                                           else "python3")))
  if spec.backend != "local":
    log("# commands")
  BACKENDS[spec.backend].describe(spec, runner, log)


def submit(spec: spec_lib.JobSpec, *, dry_run: bool = False, skip_fit_check: bool = False,
           prices: cost_lib.PriceTable | None = None, progress_every_s: float = 30.0,
           log: Log = print) -> int:
  """Validates, checks the fit, prints the plan and its cost, and runs (or resumes) the job to its
  end; returns the exit code."""
  if prices is not None and spec.target is not None:
    try:  # before any compile: a table without the target's chip is an error, never a zero
      prices.price(spec.target.generation, spec.capacity)
    except ValueError as e:
      _err(str(e))
      return exit_codes.USER_ERROR
  try:
    existing = state_lib.load_spec(spec.workdir)
  except FileNotFoundError:
    existing = None
  except Exception as e:  # pylint: disable=broad-except
    if not dry_run:
      raise
    log(f"# cannot read {spec.workdir} from here ({type(e).__name__}); planning a new job")
    existing = None
  if existing is not None and not existing.same_job(spec):
    _err(f"{spec.workdir} already holds a different job ({existing.config} "
         f"{list(existing.overrides)} on {existing.backend}); use a new workdir")
    return exit_codes.USER_ERROR
  st = state_lib.load_state(spec.workdir) if existing is not None else state_lib.RunState()
  if (existing is not None and st.phase == "done" and existing.overrides == spec.overrides
      and not dry_run):
    log(f"{spec.workdir}: the run is already complete")
    return exit_codes.OK
  rc, fp, step_s, fit = _preflight(spec, skip_fit_check, log)
  if rc:
    return rc
  spec = dataclasses.replace(spec, fingerprint=fp)
  steps = _train_steps(spec)
  log(plan_summary(spec, steps, step_s, prices))
  if dry_run:
    describe_plan(spec, log)
    return exit_codes.OK
  if existing is not None:
    log(f"resuming the job in {spec.workdir} (phase {st.phase}, attempt {st.attempt})")
  state_lib.save_spec(spec)
  if fit is not None:  # the hosts load the fit check's executable instead of compiling
    from launch import preflight  # pylint: disable=g-import-not-at-top
    preflight.ship_executable(fit, spec.workdir, log)
  state_lib.clear_stop(spec.workdir)
  if st.phase in state_lib.FINAL_PHASES:
    st.phase, st.resource = "submitted", ""
    st.event("resubmitted")
    state_lib.save_state(spec.workdir, st)
  try:
    reporter = progress_lib.Reporter(spec.workdir, steps, progress_every_s, log)
    return BACKENDS[spec.backend].run(spec, gcloud.Runner(log=log), log=log, progress=reporter)
  except gcloud.CommandError as e:
    _err(str(e))
    return exit_codes.INTERNAL
  except KeyboardInterrupt:
    # Cloud jobs run on their own (the startup script / the JobSet controller); only the babysitting
    # stops. (The local backend handles Ctrl-C itself: it stops its processes.)
    log(f"babysitting interrupted; the job keeps running. Re-submit the same command to resume it, "
        f"python -m launch.stop --workdir={spec.workdir} to stop it.")
    return exit_codes.PREEMPTED


# ------------------------------------------------------------------------------------ status, logs


def status(workdir: str, log: Log = print) -> int:
  spec = state_lib.load_spec(workdir)
  st = state_lib.load_state(workdir)
  target = f"{spec.target.accelerator_type} x {spec.num_slices}" if spec.target else "this machine"
  log(f"run {spec.run_id}: {spec.backend} on {target}, config {spec.config} {list(spec.overrides)}")
  log(f"phase {st.phase}, attempt {st.attempt}, preemptions {st.preemptions}/"
      f"{spec.budgets.max_preemptions}, failures {st.failures}/{spec.budgets.max_failures}"
      + (f", resource {st.resource}" if st.resource else "") + (f": {st.message}" if st.message else ""))
  now = time.time()
  for i in range(spec.num_hosts):
    hb = heartbeat.read_record(workdir, i)
    if hb:
      log(f"  process {i}: step {hb.step}, {hb.phase}, heartbeat {now - hb.time:.0f}s ago"
          + (f", {hb.step_time:.3f}s/step" if hb.step_time else ""))
    else:
      log(f"  process {i}: no heartbeat")
  for e in st.history[-5:]:
    log(f"  {time.strftime('%H:%M:%S', time.localtime(e['time']))} {e['event']} "
        f"{e.get('detail', e.get('resource', ''))}")
  return exit_codes.OK


_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):", re.M)


def first_traceback(text: str) -> str | None:
  """The first Python traceback in a log, through its final exception line."""
  m = _TRACEBACK.search(text)
  if not m:
    return None
  lines = text[m.start():].splitlines()
  out = [lines[0]]
  for line in lines[1:]:
    out.append(line)
    if line and not line.startswith((" ", "\t")):
      break
  return "\n".join(out)


def logs(workdir: str, *, follow: bool = False, lines: int = 50, log: Log = print,
         poll_s: float = 2.0) -> int:
  """Tail of worker 0's log (followed with follow=True), then the first traceback of any worker."""
  spec = state_lib.load_spec(workdir)
  text = workdir_lib.read_text_if_exists(state_lib.log_path(workdir, 0)) or ""
  log("\n".join(text.splitlines()[-lines:]))
  while follow and state_lib.load_state(workdir).phase not in state_lib.FINAL_PHASES:
    time.sleep(poll_s)
    new = workdir_lib.read_text_if_exists(state_lib.log_path(workdir, 0)) or ""
    if len(new) > len(text):
      log(new[len(text):].rstrip("\n"))
    text = new
  for i in range(spec.num_hosts):
    tb = first_traceback(workdir_lib.read_text_if_exists(state_lib.log_path(workdir, i)) or "")
    if tb:
      log(f"===== first traceback: process {i} ({state_lib.log_path(workdir, i)})")
      log(tb)
      break
  return exit_codes.OK


# ------------------------------------------------------------------------------------ stop, gc


def stop(workdir: str, *, dry_run: bool = False, log: Log = print) -> int:
  """No more restarts; the job is stopped (the trainer saves on SIGTERM) and its resources freed."""
  spec = state_lib.load_spec(workdir)
  st = state_lib.load_state(workdir)
  runner = gcloud.Runner(dry_run=dry_run, log=log)
  if dry_run:
    log(f"# write {state_lib.path(workdir, 'STOP')}")
  else:
    state_lib.request_stop(workdir)
  BACKENDS[spec.backend].stop(spec, st, runner, log)
  if not dry_run and st.phase not in state_lib.FINAL_PHASES:
    st.phase, st.message = "stopped", "launch.stop"
    st.event("stopped")
    state_lib.save_state(workdir, st)
  return exit_codes.OK


def gc(workdir: str, *, dry_run: bool = False, log: Log = print) -> int:
  """Deletes this run's cloud resources that no live attempt uses (leaked, finished, failed)."""
  spec = state_lib.load_spec(workdir)
  st = state_lib.load_state(workdir)
  keep = st.resource if st.phase not in state_lib.FINAL_PHASES else ""
  runner = gcloud.Runner(dry_run=dry_run, log=log)
  lister = gcloud.Runner(log=log)  # listing changes nothing, so it runs even in a dry run
  deleted = BACKENDS[spec.backend].gc(spec, st, runner, lister, log)
  log(f"gc: deleted {deleted or 'nothing'}" + (f" (kept {keep}, the live attempt)" if keep else ""))
  return exit_codes.OK
