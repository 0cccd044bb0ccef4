"""What the CLIs do (submit, status, logs, stop, gc), as importable functions."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import sys
import time
from typing import Callable

from launch import bundle
from launch import commands
from launch import gcloud
from launch import spec as spec_lib
from launch import state as state_lib
from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import heartbeat
from recurrentgemma_tpu import workdir as workdir_lib

Log = Callable[[str], None]


def _err(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------ submit


def _local_devices_per_process() -> int:
  m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  return int(m.group(1)) if m else 1


def _preflight(spec: spec_lib.JobSpec, skip_fit_check: bool, log: Log) -> tuple[int, str]:
  """(exit code or 0, fingerprint). Cloud jobs always validate; the fit check only for them."""
  from launch import preflight  # pylint: disable=g-import-not-at-top
  if spec.backend == "local" and skip_fit_check:
    return 0, ""  # the trainer validates at start and exits 2 (not retried) on a bad config
  try:
    if spec.backend == "local":
      from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
      config = experiment_lib.load_config(spec.config, spec.overrides)
      n = spec.num_processes * _local_devices_per_process()
      return 0, experiment_lib.build(config, num_devices=n).fingerprint()
    fp = preflight.fingerprint(spec)
    if skip_fit_check:
      return 0, fp
    fit = preflight.fit_check(spec, fp, log=log)
  except (ValueError, FileNotFoundError) as e:
    _err(f"invalid job: {e}")
    return exit_codes.USER_ERROR, ""
  log(fit.report + ("\n(fit check cached)" if fit.cached else ""))
  if not fit.fits:
    _err(f"the plan does not fit {spec.target.accelerator_type} x {spec.num_slices}; see the report "
         "above (python -m recurrentgemma_tpu.compile --search finds plans that do)")
    return exit_codes.NO_FIT, fp
  return 0, fp


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
  if spec.backend == "local":
    log(f"# logs: {workdir_lib.join(spec.workdir, workdir_lib.LOGS_DIR, 'process_<i>.log')} (port chosen at start)")
    return
  log("# commands")
  wheel = bundle.ship(runner, spec.workdir)
  if spec.backend == "tpu_vm":
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
  else:
    from launch.backends import gke  # pylint: disable=g-import-not-at-top
    runner.run(commands.gke_credentials(spec))
    runner.run(commands.kubectl_apply("jobset.yaml"))
    log("# jobset.yaml")
    log(gke.to_yaml(commands.jobset(spec, 1, wheel)))


def submit(spec: spec_lib.JobSpec, *, dry_run: bool = False, skip_fit_check: bool = False,
           log: Log = print) -> int:
  """Validates, checks the fit, and runs (or resumes) the job to its end; returns the exit code."""
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
  if existing is not None and st.phase == "done" and not dry_run:
    log(f"{spec.workdir}: the run is already complete")
    return exit_codes.OK
  rc, fp = _preflight(spec, skip_fit_check, log)
  if rc:
    return rc
  spec = dataclasses.replace(spec, fingerprint=fp)
  if dry_run:
    describe_plan(spec, log)
    return exit_codes.OK
  if existing is not None:
    log(f"resuming the job in {spec.workdir} (phase {st.phase}, attempt {st.attempt})")
  state_lib.save_spec(spec)
  state_lib.clear_stop(spec.workdir)
  if st.phase in state_lib.FINAL_PHASES:
    st.phase, st.resource = "submitted", ""
    st.event("resubmitted")
    state_lib.save_state(spec.workdir, st)
  try:
    if spec.backend == "local":
      from launch.backends import local  # pylint: disable=g-import-not-at-top
      return local.run(spec, log=log)
    runner = gcloud.Runner(log=log)
    wheel = bundle.ship(runner, spec.workdir)
    if spec.backend == "tpu_vm":
      from launch.backends import tpu_vm  # pylint: disable=g-import-not-at-top
      return tpu_vm.run(spec, runner, wheel, log=log)
    from launch.backends import gke  # pylint: disable=g-import-not-at-top
    return gke.run(spec, runner, wheel, log=log)
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
  return 0


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
  return 0


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
  if spec.backend == "local":
    from launch.backends import local  # pylint: disable=g-import-not-at-top
    for pid in local.live_pids(st):
      log(f"SIGTERM to process group {pid}")
      if not dry_run:
        os.killpg(pid, signal.SIGTERM)
  elif spec.backend == "tpu_vm" and st.resource:
    from launch.backends import tpu_vm  # pylint: disable=g-import-not-at-top
    tpu_vm.delete(runner, spec, st.resource)
  elif spec.backend == "gke" and st.resource:
    runner.run(commands.kubectl_delete_jobset(st.resource))
  if not dry_run and st.phase not in state_lib.FINAL_PHASES:
    st.phase, st.message = "stopped", "launch.stop"
    st.event("stopped")
    state_lib.save_state(workdir, st)
  return 0


def gc(workdir: str, *, dry_run: bool = False, log: Log = print) -> int:
  """Deletes this run's cloud resources that no live attempt uses (leaked, finished, failed)."""
  spec = state_lib.load_spec(workdir)
  st = state_lib.load_state(workdir)
  keep = st.resource if st.phase not in state_lib.FINAL_PHASES else ""
  runner = gcloud.Runner(dry_run=dry_run, log=log)
  lister = gcloud.Runner(log=log)  # listing changes nothing, so it runs even in a dry run
  deleted = []
  if spec.backend == "tpu_vm":
    from launch.backends import tpu_vm  # pylint: disable=g-import-not-at-top
    res = lister.run(commands.qr_list(spec.zone, spec.project, spec.run_id))
    for qr in json.loads(res.stdout or "[]"):
      name = qr.get("name", "").rsplit("/", 1)[-1]
      if name and name != keep:
        tpu_vm.delete(runner, spec, name)
        deleted.append(name)
  elif spec.backend == "gke":
    res = lister.run(commands.kubectl_list_jobsets())
    for item in json.loads(res.stdout or "{}").get("items", []):
      meta = item.get("metadata", {})
      if meta.get("labels", {}).get(commands.LABEL) == spec.run_id and meta.get("name") != keep:
        runner.run(commands.kubectl_delete_jobset(meta["name"]))
        deleted.append(meta["name"])
  log(f"gc: deleted {deleted or 'nothing'}" + (f" (kept {keep}, the live attempt)" if keep else ""))
  return 0
