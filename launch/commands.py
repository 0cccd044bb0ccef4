"""Pure builders: job spec -> each host's argv and environment, gcloud/kubectl argv, startup script,
JobSet. Nothing here runs anything or touches the filesystem; everything returns lists, strings, dicts.
"""

from __future__ import annotations

import shlex
from typing import Any

from launch import spec as spec_lib
from recurrentgemma_tpu import exit_codes

TRAIN_MODULE = "recurrentgemma_tpu.train"
COORDINATOR_PORT = 8476  # jax.distributed's default port on process 0
MEGASCALE_PORT = 8081
LABEL = "rg-launch"  # every cloud resource carries rg-launch=<run_id>; `gc` finds them by it
# jax.distributed timeouts handed to every host (read by recurrentgemma_tpu/distributed.py).
INITIALIZATION_TIMEOUT_S = 1800
HEARTBEAT_TIMEOUT_S = 600


def train_argv(spec: spec_lib.JobSpec, python: str = "python3") -> list[str]:
  """What every host runs, exactly."""
  return ([python, "-m", TRAIN_MODULE, f"--config={spec.config}", f"--workdir={spec.workdir}"]
          + [f"--config.{o}" for o in spec.overrides])


def host_env(spec: spec_lib.JobSpec, process_id: int, coordinator_host: str,
             coordinator_port: int = COORDINATOR_PORT) -> dict[str, str]:
  """The environment of one host (process), computed by the launcher for every backend."""
  if not 0 <= process_id < spec.num_hosts:
    raise ValueError(f"process_id={process_id} outside 0..{spec.num_hosts - 1}")
  if spec.num_hosts == 1:
    return {}  # one process: no jax.distributed (a sweep trial, a single-host slice)
  env = {
      "JAX_COORDINATOR_ADDRESS": f"{coordinator_host}:{coordinator_port}",
      "JAX_NUM_PROCESSES": str(spec.num_hosts),
      "JAX_PROCESS_ID": str(process_id),
      "JAX_INITIALIZATION_TIMEOUT_SECONDS": str(INITIALIZATION_TIMEOUT_S),
      "JAX_HEARTBEAT_TIMEOUT_SECONDS": str(HEARTBEAT_TIMEOUT_S),
  }
  if spec.num_slices > 1:
    hosts_per_slice = spec.target.hosts
    env.update({
        # Set from the launcher's own view, never trusted from the provider (stale values after a
        # slice is replaced make initialize hang).
        "MEGASCALE_COORDINATOR_ADDRESS": f"{coordinator_host}:{MEGASCALE_PORT}",
        "MEGASCALE_NUM_SLICES": str(spec.num_slices),
        "MEGASCALE_SLICE_ID": str(process_id // hosts_per_slice),
        "MEGASCALE_PORT": str(MEGASCALE_PORT),
    })
  return env


def quote(argv: list[str]) -> str:
  return shlex.join(argv)


# ------------------------------------------------------------------------------------ labels, names


def labels(spec: spec_lib.JobSpec) -> dict[str, str]:
  """GCE/Kubernetes labels that identify the run (values: lowercase, digits, '-', '_', <= 63)."""
  out = {LABEL: spec.run_id, "rg-backend": spec.backend.replace("_", "-")}
  if spec.fingerprint:
    out["rg-config"] = spec.fingerprint[:16]
  return out


def resource_name(spec: spec_lib.JobSpec, attempt: int) -> str:
  """Queued resource / JobSet name of one attempt (a new name each time: deletion is asynchronous)."""
  return f"{spec.run_id}-{attempt}"


def node_names(spec: spec_lib.JobSpec, attempt: int) -> list[str]:
  """TPU VM names: the QR's --node-id, or <prefix>-<i> for --node-count."""
  name = resource_name(spec, attempt)
  if spec.num_slices == 1:
    return [name]
  return [f"{name}-{i}" for i in range(spec.num_slices)]


# ------------------------------------------------------------------------------------ gcloud


def _where(spec: spec_lib.JobSpec) -> list[str]:
  return [f"--zone={spec.zone}", f"--project={spec.project}"]


_CAPACITY_FLAGS = {"on-demand": [], "reserved": ["--reserved"], "spot": ["--spot"],
                   "best-effort": ["--best-effort"]}


def qr_create(spec: spec_lib.JobSpec, attempt: int, startup_script_file: str) -> list[str]:
  """`gcloud alpha compute tpus queued-resources create` for one attempt."""
  name = resource_name(spec, attempt)
  nodes = ([f"--node-id={name}"] if spec.num_slices == 1 else
           [f"--node-count={spec.num_slices}", f"--node-prefix={name}"])
  label_text = ",".join(f"{k}={v}" for k, v in sorted(labels(spec).items()))
  return (["gcloud", "alpha", "compute", "tpus", "queued-resources", "create", name,
           f"--accelerator-type={spec.target.accelerator_type}",
           f"--runtime-version={spec.target.runtime_version}"] + nodes + _where(spec)
          + _CAPACITY_FLAGS[spec.capacity]
          + [f"--labels={label_text}", f"--metadata-from-file=startup-script={startup_script_file}",
             "--quiet"])


def qr_describe(spec: spec_lib.JobSpec, name: str) -> list[str]:
  return (["gcloud", "alpha", "compute", "tpus", "queued-resources", "describe", name] + _where(spec)
          + ["--format=json"])


def qr_delete(spec: spec_lib.JobSpec, name: str) -> list[str]:
  # --force also deletes the TPU VMs; without it only a SUSPENDED queued resource can be deleted.
  return (["gcloud", "alpha", "compute", "tpus", "queued-resources", "delete", name] + _where(spec)
          + ["--force", "--async", "--quiet"])


def qr_list(zone: str, project: str, run_id: str = "") -> list[str]:
  """Queued resources of this project (label rg-launch), or of one run."""
  flt = f"labels.{LABEL}={run_id}" if run_id else f"labels.{LABEL}:*"
  return ["gcloud", "alpha", "compute", "tpus", "queued-resources", "list", f"--zone={zone}",
          f"--project={project}", f"--filter={flt}", "--format=json"]


def tpu_ssh(spec: spec_lib.JobSpec, node: str, command: str, worker: str = "all") -> list[str]:
  """Runs `command` on the workers of one slice (interactive runs, restarts in place)."""
  return (["gcloud", "alpha", "compute", "tpus", "tpu-vm", "ssh", node, f"--worker={worker}"]
          + _where(spec) + [f"--command={command}", "--quiet"])


def restart_in_place_command(run_id: str) -> str:
  """Re-runs the startup script on a worker (it kills this run's old processes first)."""
  return f"sudo nohup bash /var/lib/rg-launch/{run_id}/startup.sh >/dev/null 2>&1 &"


# ------------------------------------------------------------------------------------ startup script


def startup_script(spec: spec_lib.JobSpec, wheel_url: str) -> str:
  """The TPU VM startup script: hygiene, install the wheel, compute the env, run the job, report.

  It runs on every boot (and again on a restart in place), so it is idempotent: the trainer resumes
  from the workdir's newest checkpoint, and a finished run exits 0 at once.
  """
  hosts_per_slice = spec.target.hosts
  argv = quote(train_argv(spec))
  exit_dir = f"{spec.workdir.rstrip('/')}/launch/exit"
  log_dir = f"{spec.workdir.rstrip('/')}/logs"
  cp = ("gcloud storage cp" if spec.workdir.startswith("gs://") else "cp")
  lines = f"""#!/bin/bash
# rg-launch startup script for run {spec.run_id}; generated by launch/commands.py.
set -uo pipefail
RUN_DIR=/var/lib/rg-launch/{spec.run_id}
mkdir -p "$RUN_DIR"
if [[ "${{BASH_SOURCE[0]}}" != "$RUN_DIR/startup.sh" ]]; then cp "${{BASH_SOURCE[0]}}" "$RUN_DIR/startup.sh" 2>/dev/null || true; fi
exec >>"$RUN_DIR/startup.log" 2>&1
echo "rg-launch: start $(date -u +%FT%TZ)"
# The newest instance of this script owns the run; an older one (restart in place) reports nothing.
echo $$ > "$RUN_DIR/owner"
md() {{ curl -sf -H Metadata-Flavor:Google "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"; }}
tpu_env() {{ md tpu-env | sed -n "s/^$1: '\\(.*\\)'$/\\1/p"; }}

# Host hygiene: this run's previous trainer, anything holding the TPU, libtpu's lock file.
if [[ -f "$RUN_DIR/train.pid" ]]; then kill -9 "$(cat "$RUN_DIR/train.pid")" 2>/dev/null || true; fi
for dev in /dev/accel* /dev/vfio/[0-9]*; do
  [[ -e "$dev" ]] && for pid in $(lsof -t "$dev" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
done
rm -f /tmp/libtpu_lockfile

# Code: the wheel built by the launcher, next to the run.
WHEEL="$RUN_DIR/$(basename {shlex.quote(wheel_url)})"
for i in $(seq 1 30); do {cp} {shlex.quote(wheel_url)} "$WHEEL" && break; sleep 10; done
python3 -m pip install --quiet --upgrade "$WHEEL[tpu]" || exit 1
cd "$(python3 -c 'import configs, os; print(os.path.dirname(os.path.dirname(configs.__file__)))')"

# Multi-host environment: computed here from the launcher's naming, not trusted from the provider.
WORKER_ID=$(tpu_env WORKER_ID); WORKER_ID=${{WORKER_ID:-0}}
NODE_ID=$(tpu_env NODE_ID)
SLICE_ID=0
"""
  if spec.num_slices > 1:
    lines += f"""SLICE_ID=${{NODE_ID##*-}}  # nodes are named <queued resource>-<slice>
COORDINATOR=$(tpu_env MEGASCALE_COORDINATOR_ADDRESS); COORDINATOR=${{COORDINATOR%%:*}}
export MEGASCALE_COORDINATOR_ADDRESS="$COORDINATOR:{MEGASCALE_PORT}"
export MEGASCALE_NUM_SLICES={spec.num_slices}
export MEGASCALE_SLICE_ID=$SLICE_ID
export MEGASCALE_PORT={MEGASCALE_PORT}
"""
  else:
    lines += """COORDINATOR=$(md worker-network-endpoints | cut -d, -f1 | cut -d: -f3)
"""
  lines += f"""PROCESS_ID=$(( SLICE_ID * {hosts_per_slice} + WORKER_ID ))
"""
  if spec.num_hosts > 1:
    lines += f"""export JAX_COORDINATOR_ADDRESS="$COORDINATOR:{COORDINATOR_PORT}"
export JAX_NUM_PROCESSES={spec.num_hosts}
export JAX_PROCESS_ID=$PROCESS_ID
export JAX_INITIALIZATION_TIMEOUT_SECONDS={INITIALIZATION_TIMEOUT_S}
export JAX_HEARTBEAT_TIMEOUT_SECONDS={HEARTBEAT_TIMEOUT_S}
"""
  lines += f"""

LOG="$RUN_DIR/process_$PROCESS_ID.log"
( while sleep 30; do {cp} "$LOG" "{log_dir}/process_$PROCESS_ID.log" >/dev/null 2>&1; done ) &
SYNC=$!
{argv} >>"$LOG" 2>&1 &
echo $! > "$RUN_DIR/train.pid"
wait $!
RC=$?
kill $SYNC 2>/dev/null
[[ "$(cat "$RUN_DIR/owner")" == "$$" ]] || exit 0
{cp} "$LOG" "{log_dir}/process_$PROCESS_ID.log"
echo "{{\\"rc\\": $RC, \\"time\\": $(date +%s)}}" > "$RUN_DIR/exit.json"
{cp} "$RUN_DIR/exit.json" "{exit_dir}/process_$PROCESS_ID.json"
echo "rg-launch: trainer exited $RC"
"""
  return lines


# ------------------------------------------------------------------------------------ GKE


def jobset(spec: spec_lib.JobSpec, attempt: int, wheel_url: str) -> dict[str, Any]:
  """An xpk-compatible JobSet (jobset.x-k8s.io/v1alpha2): one replicated job per slice, one slice
  per node pool, Kueue queue label, restart on exit 42 and signal deaths, fail on anything else."""
  t = spec.target
  name = resource_name(spec, attempt)
  hosts = t.hosts
  # Kubernetes gives no per-host id before the pod starts: the JobSet labels give the slice and the
  # job completion index gives the worker; the coordinator is pod 0 of slice 0 (JobSet's DNS).
  coordinator = f"{name}-slice-job-0-0.{name}"
  env = [
      {"name": "JAX_COORDINATOR_ADDRESS", "value": f"{coordinator}:{COORDINATOR_PORT}"},
      {"name": "JAX_NUM_PROCESSES", "value": str(spec.num_hosts)},
      {"name": "JAX_INITIALIZATION_TIMEOUT_SECONDS", "value": str(INITIALIZATION_TIMEOUT_S)},
      {"name": "JAX_HEARTBEAT_TIMEOUT_SECONDS", "value": str(HEARTBEAT_TIMEOUT_S)},
      {"name": "SLICE_ID", "valueFrom": {"fieldRef": {
          "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}},
      {"name": "WORKER_ID", "valueFrom": {"fieldRef": {
          "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
  ]
  if spec.num_slices > 1:
    env += [
        {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{coordinator}:{MEGASCALE_PORT}"},
        {"name": "MEGASCALE_NUM_SLICES", "value": str(spec.num_slices)},
        {"name": "MEGASCALE_SLICE_ID", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}},
        {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)},
    ]
  cp = "gcloud storage cp" if wheel_url.startswith("gs://") else "cp"
  script = f"""set -uo pipefail
export JAX_PROCESS_ID=$(( SLICE_ID * {hosts} + WORKER_ID ))
rm -f /tmp/libtpu_lockfile
WHEEL=/tmp/$(basename {shlex.quote(wheel_url)})
{cp} {shlex.quote(wheel_url)} "$WHEEL" && python3 -m pip install --quiet "$WHEEL[tpu]" || exit 1
cd "$(python3 -c 'import configs, os; print(os.path.dirname(os.path.dirname(configs.__file__)))')"
LOG=/tmp/process_$JAX_PROCESS_ID.log
{quote(train_argv(spec))} > >(tee -a "$LOG") 2>&1 &
PID=$!
trap 'kill -TERM $PID' TERM
wait $PID; RC=$?
# A trapped SIGTERM interrupts `wait`; wait again for the trainer's own exit code (42 after saving).
if [[ $RC -gt 128 ]] && kill -0 $PID 2>/dev/null; then wait $PID; RC=$?; fi
{cp} "$LOG" "{spec.workdir.rstrip('/')}/logs/process_$JAX_PROCESS_ID.log"
echo EXIT_CODE=$RC
exit $RC
"""
  chips_per_host = t.chips_per_host
  pod_spec = {
      "restartPolicy": "Never",
      "hostNetwork": True,
      "dnsPolicy": "ClusterFirstWithHostNet",
      "terminationGracePeriodSeconds": 300,
      "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": t.gke_accelerator,
                       "cloud.google.com/gke-tpu-topology": t.topology},
      "tolerations": [{"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}],
      "containers": [{
          "name": "train",
          "image": spec.image,
          "command": ["bash", "-c", script],
          "env": env,
          "ports": [{"containerPort": COORDINATOR_PORT}, {"containerPort": MEGASCALE_PORT}],
          "securityContext": {"privileged": True},
          "resources": {"limits": {"google.com/tpu": chips_per_host}},
          "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
      }],
      "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
  }
  job_template = {
      "metadata": {"labels": labels(spec)},
      "spec": {
          "parallelism": hosts,
          "completions": hosts,
          "completionMode": "Indexed",
          "backoffLimit": 0,
          # xpk's rule: exit 42 (preempted, saved) and deaths by signal (128+) restart the JobSet;
          # every other non-zero exit fails the job at once.
          "podFailurePolicy": {"rules": [
              {"action": "FailJob", "onExitCodes": {
                  "containerName": "train", "operator": "NotIn",
                  "values": [exit_codes.PREEMPTED] + list(range(128, 256))}},
              {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget",
                                                        "status": "True"}]},
          ]},
          "template": {"metadata": {"labels": labels(spec)}, "spec": pod_spec},
      },
  }
  b = spec.budgets
  return {
      "apiVersion": "jobset.x-k8s.io/v1alpha2",
      "kind": "JobSet",
      "metadata": {
          "name": name,
          "labels": {**labels(spec), "kueue.x-k8s.io/queue-name": spec.kueue_queue},
          "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology":
                          "cloud.google.com/gke-nodepool"},
      },
      "spec": {
          "failurePolicy": {
              "maxRestarts": b.max_preemptions + b.max_failures,
              "rules": [{"name": "fail-on-error-exit", "action": "FailJobSet",
                         "onJobFailureReasons": ["PodFailurePolicy"]}],
          },
          "replicatedJobs": [{"name": "slice-job", "replicas": spec.num_slices,
                              "template": job_template}],
          "ttlSecondsAfterFinished": 12 * 3600,
      },
  }


def kubectl_apply(manifest_file: str, context: str = "") -> list[str]:
  return ["kubectl"] + ([f"--context={context}"] if context else []) + ["apply", "-f", manifest_file]


def kubectl_get_jobset(name: str) -> list[str]:
  return ["kubectl", "get", "jobset", name, "-o", "json"]


def kubectl_delete_jobset(name: str) -> list[str]:
  return ["kubectl", "delete", "jobset", name, "--ignore-not-found", "--wait=false"]


def kubectl_list_jobsets() -> list[str]:
  return ["kubectl", "get", "jobsets", "-l", LABEL, "-o", "json"]


def gke_credentials(spec: spec_lib.JobSpec) -> list[str]:
  """Points kubectl at the cluster (region or zone both work as --location)."""
  return ["gcloud", "container", "clusters", "get-credentials", spec.cluster,
          f"--location={spec.zone}", f"--project={spec.project}"]
