r"""Submit (or resume) a training job.

  python -m launch.submit --config=configs/X.py --workdir=DIR_OR_GS_URL --target=v5p-256 \
      [--num_slices=N] [--backend=local|tpu_vm|gke] [--capacity=on-demand|reserved|spot|best-effort] \
      [--num_processes=N (local)] [--zone=..] [--project=..] [--dry_run] [--skip_fit_check] \
      [--prices=FILE] [--config.K=V ...]

Re-submitting the same workdir resumes the job (the trainer continues from its newest checkpoint);
a different job in the same workdir is refused. Exit codes: 0 run complete, 42 stopped or preempted
out of budget (retry later), 1 failed, 2 bad request or invalid config, 3 the trainer stopped on
NaN/Inf, 4 the plan does not fit the target (the planner's report is printed). See docs/launch.md.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from launch import spec as spec_lib
from recurrentgemma_tpu import exit_codes

_CONFIG = flags.DEFINE_string("config", None, "Experiment config file, configs/NAME.py[:ARG].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
_TARGET = flags.DEFINE_string("target", None, "TPU slice: v5p-256, v5litepod-16, v6e-8 or v5p:4x4x8.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices over DCN (multi-slice).")
_BACKEND = flags.DEFINE_enum("backend", "tpu_vm", spec_lib.BACKENDS, "Where the job runs.")
_CAPACITY = flags.DEFINE_enum("capacity", "on-demand", spec_lib.CAPACITIES, "TPU capacity kind.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "local backend: processes (hosts) to run.")
_ZONE = flags.DEFINE_string("zone", "", "Cloud zone (tpu_vm), cluster location (gke).")
_PROJECT = flags.DEFINE_string("project", "", "Cloud project.")
_CLUSTER = flags.DEFINE_string("cluster", "", "gke: GKE cluster name.")
_QUEUE = flags.DEFINE_string("kueue_queue", "multislice-queue", "gke: Kueue LocalQueue.")
_IMAGE = flags.DEFINE_string("image", "", "gke: container image (python3.11+ with pip).")
_ALLOW_LOCAL = flags.DEFINE_bool("allow_local_workdir", False, "tpu_vm/gke: accept a non-gs:// "
                                 "workdir that every host mounts (NFS, gcsfuse).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Change nothing; print every command, script, "
                             "manifest and each host's environment.")
_SKIP_FIT = flags.DEFINE_bool("skip_fit_check", False, "Skip the ahead-of-time fit check (tpu_vm/"
                              "gke still validate the config; local then validates nothing itself).")
_PRICES = flags.DEFINE_string("prices", None, "Price table (YAML or JSON) for the cost estimate: "
                              "price per chip-hour by chip generation and capacity kind "
                              "(configs/prices/example.yaml; docs/launch.md, \"Cost\").")
_PROGRESS = flags.DEFINE_float("progress_every", 30, "local: seconds between progress lines (step, "
                               "loss, ETA, restarts) while the job compiles or trains.")
_MAX_PREEMPTIONS = flags.DEFINE_integer("max_preemptions", 100, "Restarts after preemptions (exit 42, "
                                        "lost VMs).")
_MAX_FAILURES = flags.DEFINE_integer("max_failures", 3, "Restarts after failures (other exits, hangs).")
_QUEUE_TIMEOUT = flags.DEFINE_float("queue_timeout", 6 * 3600, "Seconds to wait for capacity; then "
                                    "the queued resource/JobSet is deleted. 0: forever.")
_RUN_TIMEOUT = flags.DEFINE_float("run_timeout", 0, "Seconds of running before giving up. 0: none.")
_STARTUP_TIMEOUT = flags.DEFINE_float("startup_timeout", 1800, "Seconds from start to the first "
                                      "training heartbeat (covers install and compile).")
_HANG_FACTOR = flags.DEFINE_float("hang_factor", 10, "Hung after this many step times without a "
                                  "heartbeat...")
_MIN_HANG = flags.DEFINE_float("min_hang", 300, "...but never sooner than this many seconds.")
_POLL = flags.DEFINE_float("poll", 60, "Seconds between looks at a cloud job (local: 0.5).")

flags.mark_flags_as_required(["config", "workdir"])


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.K=V` overrides (returned as "K=V") from the launcher's own flags."""
  rest, overrides = [], []
  for a in argv:
    if a.startswith("--config."):
      overrides.append(a[len("--config."):])
    else:
      rest.append(a)
  return rest, overrides


_OVERRIDES: list[str] = []


def _split(argv: list[str]) -> list[str]:
  rest, overrides = split_overrides(argv)
  _OVERRIDES[:] = overrides
  return rest


def spec_from_flags() -> spec_lib.JobSpec:
  target = spec_lib.parse_target(_TARGET.value) if _TARGET.value else None
  budgets = spec_lib.Budgets(
      max_preemptions=_MAX_PREEMPTIONS.value, max_failures=_MAX_FAILURES.value,
      queue_timeout_s=_QUEUE_TIMEOUT.value, run_timeout_s=_RUN_TIMEOUT.value,
      startup_timeout_s=_STARTUP_TIMEOUT.value, hang_factor=_HANG_FACTOR.value,
      min_hang_s=_MIN_HANG.value, poll_s=_POLL.value)
  return spec_lib.JobSpec(
      config=_CONFIG.value, overrides=tuple(_OVERRIDES), workdir=_WORKDIR.value.rstrip("/"),
      backend=_BACKEND.value, target=target, num_slices=_NUM_SLICES.value,
      capacity=_CAPACITY.value, num_processes=_NUM_PROCESSES.value, zone=_ZONE.value,
      project=_PROJECT.value, cluster=_CLUSTER.value, kueue_queue=_QUEUE.value, image=_IMAGE.value,
      allow_local_workdir=_ALLOW_LOCAL.value, budgets=budgets)


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from launch import cost  # pylint: disable=g-import-not-at-top
  from launch import jobs  # pylint: disable=g-import-not-at-top
  try:
    spec = spec_from_flags()
    prices = cost.load(_PRICES.value) if _PRICES.value else None
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return exit_codes.USER_ERROR
  return jobs.submit(spec, dry_run=_DRY_RUN.value, skip_fit_check=_SKIP_FIT.value, prices=prices,
                     progress_every_s=_PROGRESS.value)


def run() -> None:
  """Console-script entry point (`rg-launch`)."""
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, __doc__, config_flags_names=(), split=_split, codes=(
      "exit codes: 0 run complete, 1 failed, 2 bad request, 3 NaN/Inf stop, 4 does not fit,\n"
      "42 stopped or preempted out of budget (retry later)."))


if __name__ == "__main__":
  run()
