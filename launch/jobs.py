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
from recurrentgemma_tpu import goodput as goodput_lib
from recurrentgemma_tpu import heartbeat
from recurrentgemma_tpu import profiling
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
  submitted = time.time()  # the goodput ledger's clock starts here (the checks count as queueing)
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
  st.event("submitted", time=round(submitted, 3))
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


def status(workdir: str, *, goodput: bool = False, log: Log = print) -> int:
  """The run's phase, budgets, each process's heartbeat and recent events; with `goodput`, then
  where its wall-clock time went (recurrentgemma_tpu/goodput.py)."""
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
  if goodput:
    ledger = goodput_lib.read(workdir, live=st.phase not in state_lib.FINAL_PHASES)
    for line in ledger.lines():
      log(line)
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


# ------------------------------------------------------------------------------------ profile


def _processes(workdir: str) -> list[int]:
  """The process indices that have written a heartbeat."""
  names = workdir_lib.listdir(workdir_lib.join(workdir, workdir_lib.HEARTBEAT_DIR))
  return sorted(int(m.group(1)) for m in map(re.compile(r"process_(\d+)\.json$").match, names) if m)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's process: it exists
  return True


def not_running(workdir: str, now: float) -> str | None:
  """Why `workdir` has no running training job (from process 0's heartbeat), or None if it has one.

  Not running: no heartbeat, a heartbeat that says done, a launcher state that is final, a local
  job's process 0 gone, or a heartbeat older than the launcher's hang rule (max(min_hang_s,
  hang_factor x step time), with the run's own budgets when a launcher started it).
  """
  beat = heartbeat.read_record(workdir, 0)
  if beat is None:
    return f"{workdir} is not running: it has no heartbeat ({heartbeat.path(workdir, 0)})"
  if beat.phase == "done":
    return (f"{workdir} is not running: its last heartbeat says done at step {beat.step} "
            f"({now - beat.time:.0f}s ago)")
  try:
    spec = state_lib.load_spec(workdir)
  except FileNotFoundError:
    spec = None  # started without the launcher (python -m recurrentgemma_tpu.train)
  if spec is not None:
    st = state_lib.load_state(workdir)
    if st.phase in state_lib.FINAL_PHASES:
      return f"{workdir} is not running: the launcher's state is {st.phase} ({st.message or 'no message'})"
    if spec.backend == "local" and not _alive(beat.pid):
      return (f"{workdir} is not running: its process 0 (pid {beat.pid}, last heartbeat at step "
              f"{beat.step}) has exited")
  budgets = spec.budgets if spec is not None else spec_lib.Budgets()
  limit = max(budgets.min_hang_s, budgets.hang_factor * (beat.step_time or 0.0))
  if beat.phase in ("starting", "compiling", "evaluating", "saving"):
    limit = max(limit, budgets.startup_timeout_s)
  if now - beat.time > limit:
    return (f"{workdir} is not running: its last heartbeat (step {beat.step}, {beat.phase}) is "
            f"{now - beat.time:.0f}s old (a live job beats within {limit:.0f}s)")
  return None


def step_time_prediction(workdir: str) -> tuple[float | None, str]:
  """The planner's predicted step time for the run in `workdir` and where it comes from, or None
  and why there is none (read from the fit check's cache on this machine; nothing compiles)."""
  from launch import preflight  # pylint: disable=g-import-not-at-top
  try:
    spec = state_lib.load_spec(workdir)
  except FileNotFoundError:
    return None, "not started by launch.submit, so no fit check predicted its step time"
  if spec.target is None:
    return None, "a local job: the planner predicts TPU step times only"
  if not spec.fingerprint:
    return None, "submitted without a fit check (--skip_fit_check)"
  fit = preflight.cached_fit_check(spec, spec.fingerprint)
  if fit is None or fit.step_s is None:
    return None, (f"no fit check for {spec.target.accelerator_type} x {spec.num_slices} is cached "
                  f"on this machine ({preflight.cache_dir()})")
  return fit.step_s, (f"the fit check's planner for {spec.target.accelerator_type} x "
                      f"{spec.num_slices}")


def profile(workdir: str, steps: int, process: str, *, log: Log = print, poll_s: float = 1.0,
            progress_s: float = 15.0, timeout_s: float = 3600.0) -> int:
  """Asks a running job for an N-step profile, waits for every process asked, prints the digests.

  Raises:
    exit_codes.UserError: bad steps or process, or the workdir is not running.
  """
  if not 1 <= steps <= profiling.MAX_STEPS:
    raise exit_codes.UserError(f"--steps={steps}: give a number of steps from 1 to "
                               f"{profiling.MAX_STEPS} (longer traces lose device ops)")
  why = not_running(workdir, time.time())
  if why:
    raise exit_codes.UserError(why)
  known = _processes(workdir)
  if process == "all":
    wanted, index = known, None
  elif process.isdigit() and int(process) in known:
    wanted, index = [int(process)], int(process)
  else:
    raise exit_codes.UserError(f"--process={process}: give all or a process index of this run "
                               f"({', '.join(map(str, known))})")
  predicted, source = step_time_prediction(workdir)
  request = profiling.Request(id=profiling.new_request_id(), steps=steps, process=index,
                              predicted_step_s=predicted, prediction=source, time=time.time())
  profiling.write_request(workdir, request)
  log(f"profile {request.id}: {steps} steps of process {process} requested in "
      f"{profiling.request_path(workdir)}; waiting for the next step boundaries")
  deadline, last_line = time.time() + timeout_s, 0.0
  digests: dict[int, dict] = {}
  while len(digests) < len(wanted):
    for i in wanted:
      if i not in digests:
        d = profiling.read_json(profiling.digest_path(workdir, request.id, i))
        if d is not None:
          digests[i] = d
    if len(digests) == len(wanted):
      break
    now = time.time()
    why = not_running(workdir, now)
    if why or now > deadline:
      _err(f"profile {request.id} not finished: " + (why or f"no capture after {timeout_s:.0f}s"))
      return exit_codes.INTERNAL
    if now - last_line >= progress_s:
      last_line = now
      beat = heartbeat.read_record(workdir, 0)
      started = [i for i in wanted if i not in digests and workdir_lib.exists(
          profiling.started_path(workdir, request.id, i))]
      log(f"  waiting: {len(digests)}/{len(wanted)} captured, {len(started)} capturing; process 0 "
          f"at step {beat.step if beat else '?'} ({beat.phase if beat else 'no heartbeat'})")
    time.sleep(poll_s)
  failed = False
  for i in wanted:
    if "error" in digests[i]:
      failed = True
      _err(f"process {i}: the capture failed: {digests[i]['error']}")
    else:
      log(profiling.format_digest(digests[i]))
  log(f"open it: python -m xprof.server --logdir={profiling.capture_dir(workdir, request.id)} "
      "(the `profile` extra), or TensorBoard with xprof installed")
  return exit_codes.INTERNAL if failed else exit_codes.OK
