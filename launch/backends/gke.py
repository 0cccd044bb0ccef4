"""The GKE backend (run, stop, gc, describe, like every backend): one xpk-compatible JobSet per attempt, applied with kubectl.

Restarts are the JobSet controller's: exit 42 (preempted, saved) and deaths by signal restart the
whole JobSet (up to failurePolicy.maxRestarts); any other non-zero exit fails it at once. The
babysitter here only watches the JobSet's terminal state and the queueing deadline (Kueue may hold
a workload for hours), and deletes the JobSet when it times out.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Callable

from launch import bundle
from launch import commands
from launch import progress as progress_lib
from launch import gcloud
from launch import spec as spec_lib
from launch import state as state_lib
from recurrentgemma_tpu import exit_codes


def to_yaml(obj: dict[str, Any]) -> str:
  import yaml  # pylint: disable=g-import-not-at-top
  return yaml.safe_dump(obj, sort_keys=False, width=1000)


def apply(runner: gcloud.Runner, manifest: dict[str, Any]) -> None:
  with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
    f.write(to_yaml(manifest))
  try:
    runner.run(commands.kubectl_apply(f.name))
  finally:
    os.remove(f.name)


def jobset_phase(runner: gcloud.Runner, name: str) -> str:
  """"Completed", "Failed", "Suspended", "Running" or "NotFound" from the JobSet's status."""
  res = runner.run(commands.kubectl_get_jobset(name), check=False)
  if res.returncode != 0:
    return "NotFound" if "NotFound" in res.stderr else "Unknown"
  status = json.loads(res.stdout).get("status", {})
  for c in status.get("conditions", []):
    if c.get("status") == "True" and c.get("type") in ("Completed", "Failed", "Suspended"):
      return c["type"]
  return "Running" if status.get("replicatedJobsStatus") else "Queued"


def run(spec: spec_lib.JobSpec, runner: gcloud.Runner, *, log: Callable[[str], None] = print,
        progress: progress_lib.Reporter | None = None) -> int:
  """Ships the code, applies the JobSet and watches it until the run ends."""
  return babysit(spec, runner, bundle.ship(runner, spec.workdir), log=log,
                 progress=progress)


def describe(spec: spec_lib.JobSpec, runner: gcloud.Runner, log: Callable[[str], None]) -> None:
  """Prints (through a dry-run runner) the commands and the JobSet `run` would apply."""
  wheel = bundle.ship(runner, spec.workdir)
  runner.run(commands.gke_credentials(spec))
  runner.run(commands.kubectl_apply("jobset.yaml"))
  log("# jobset.yaml")
  log(to_yaml(commands.jobset(spec, 1, wheel)))


def stop(spec: spec_lib.JobSpec, st: state_lib.RunState, runner: gcloud.Runner,
         log: Callable[[str], None]) -> None:  # pylint: disable=unused-argument
  """Deletes the run's JobSet (its pods get SIGTERM: the trainer saves and exits 42)."""
  del spec
  if st.resource:
    runner.run(commands.kubectl_delete_jobset(st.resource))


def gc(spec: spec_lib.JobSpec, st: state_lib.RunState, runner: gcloud.Runner,
       lister: gcloud.Runner, log: Callable[[str], None]) -> list[str]:  # pylint: disable=unused-argument
  """Deletes the run's JobSets (by label) other than the live attempt's; their names."""
  keep = st.resource if st.phase not in state_lib.FINAL_PHASES else ""
  res = lister.run(commands.kubectl_list_jobsets())
  deleted = []
  for item in json.loads(res.stdout or "{}").get("items", []):
    meta = item.get("metadata", {})
    if meta.get("labels", {}).get(commands.LABEL) == spec.run_id and meta.get("name") != keep:
      runner.run(commands.kubectl_delete_jobset(meta["name"]))
      deleted.append(meta["name"])
  return deleted


def babysit(spec: spec_lib.JobSpec, runner: gcloud.Runner, wheel_url: str, *,
            log: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
            clock: Callable[[], float] = time.time,
            progress: progress_lib.Reporter | None = None) -> int:
  """Applies the attempt's JobSet (unless one is live) and watches it; returns the exit code."""
  wd, b = spec.workdir, spec.budgets
  st = state_lib.load_state(wd)
  runner.run(commands.gke_credentials(spec))
  if not st.resource or st.phase in state_lib.FINAL_PHASES:
    st.attempt += 1
    manifest = commands.jobset(spec, st.attempt, wheel_url)
    apply(runner, manifest)
    st.resource, st.phase = manifest["metadata"]["name"], "queued"
    st.event("applied", resource=st.resource)
    state_lib.save_state(wd, st)
    log(f"applied JobSet {st.resource}")
  since = clock()
  while True:
    if state_lib.stop_requested(wd):
      runner.run(commands.kubectl_delete_jobset(st.resource))
      st.phase = "stopped"
      state_lib.save_state(wd, st)
      return exit_codes.PREEMPTED
    phase = jobset_phase(runner, st.resource)
    if phase == "Running" and progress is not None:
      progress.poll(st.attempt - 1)
    if phase == "Completed":
      st.phase = "done"
      state_lib.save_state(wd, st)
      return exit_codes.OK
    if phase in ("Failed", "NotFound"):
      st.phase, st.message = "failed", f"JobSet {st.resource} {phase}"
      state_lib.save_state(wd, st)
      return exit_codes.INTERNAL
    if phase in ("Queued", "Suspended") and b.queue_timeout_s and clock() - since > b.queue_timeout_s:
      runner.run(commands.kubectl_delete_jobset(st.resource))
      st.phase, st.message = "failed", f"not admitted within {b.queue_timeout_s:.0f}s"
      state_lib.save_state(wd, st)
      return exit_codes.INTERNAL
    if phase == "Running" and st.phase != "running":
      st.phase = "running"
      state_lib.save_state(wd, st)
    sleep(b.poll_s)
