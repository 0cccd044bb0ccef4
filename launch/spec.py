"""The job spec: what to run (config + overrides), where (workdir), on what (target, slices), how
(backend, capacity, retry budgets, deadlines). Validated once, here; saved as <workdir>/launch/spec.json.

No jax here: the launcher must start fast on a laptop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Sequence

from sharding import chips as chips_lib

BACKENDS = ("local", "tpu_vm", "gke")
CAPACITIES = ("on-demand", "reserved", "spot", "best-effort")

# The provider's names per chip generation (sharding/chips.py owns the slice grammar and figures):
# (TPU VM runtime version, GKE accelerator label).
_PROVIDER = {
    "v4": ("tpu-ubuntu2204-base", "tpu-v4-podslice"),
    "v5e": ("v2-alpha-tpuv5-lite", "tpu-v5-lite-podslice"),
    "v5p": ("v2-alpha-tpuv5", "tpu-v5p-slice"),
    "v6e": ("v2-alpha-tpuv6e", "tpu-v6e-slice"),
}


@dataclasses.dataclass(frozen=True)
class Target:
  """One TPU slice type.

  Attributes:
    generation: chip generation as the planner names it ("v5p", "v5e", "v4", "v6e").
    accelerator_type: the Cloud TPU name, e.g. "v5p-256".
    topology: chip grid, e.g. "4x4x8".
    chips: chips per slice.
    hosts: TPU VM hosts (processes) per slice.
  """

  generation: str
  accelerator_type: str
  topology: str
  chips: int
  hosts: int

  @property
  def topology_name(self) -> str:
    """The planner's / compile's topology string, e.g. "v5p:4x4x8"."""
    return f"{self.generation}:{self.topology}"

  @property
  def chips_per_host(self) -> int:
    return self.chips // self.hosts

  @property
  def runtime_version(self) -> str:
    return _PROVIDER[self.generation][0]

  @property
  def gke_accelerator(self) -> str:
    return _PROVIDER[self.generation][1]

  @property
  def devices_per_chip(self) -> int:
    """jax devices per chip in a topology compile (v4: one per TensorCore)."""
    return chips_lib.SLICING[self.generation].devices_per_chip


def parse_target(text: str) -> Target:
  """A Target from any form sharding/chips.py accepts: "v5p-256" or "v5p:4x4x8".

  Raises:
    ValueError: naming the accepted forms.
  """
  t = chips_lib.parse_target(text)
  return Target(t.chip.name, t.accelerator_type, t.topology, t.chips, t.hosts)


def parse_targets(names: Sequence[str]) -> list[Target]:
  """Candidate targets: generations in the order first named, each by ascending chips, no repeats.

  Raises:
    ValueError: a name that is not a TPU target (the message lists the accepted forms).
  """
  parsed = [parse_target(n) for n in names if n.strip()]
  order = list(dict.fromkeys(t.generation for t in parsed))
  unique = {t.topology_name: t for t in parsed}.values()
  return sorted(unique, key=lambda t: (order.index(t.generation), t.chips))


@dataclasses.dataclass(frozen=True)
class Budgets:
  """Retry budgets and deadlines (seconds) of one job; 0 disables a deadline.

  Preemptions (exit 42, a lost VM, a SUSPENDED queued resource) and failures (any other non-zero
  exit, a hang) are counted separately: capacity loss is the provider's business and is retried many
  times, real errors only a few.
  """

  max_preemptions: int = 100
  max_failures: int = 3
  queue_timeout_s: float = 6 * 3600  # waiting for capacity (queued resource / pod scheduling)
  run_timeout_s: float = 0  # total running time of the job
  startup_timeout_s: float = 1800  # from process start to its first heartbeat after compiling
  hang_factor: float = 10.0  # no progress for hang_factor x the step time -> hung
  min_hang_s: float = 300  # ...but never sooner than this
  poll_s: float = 60  # how often the babysitter looks (cloud); the local backend polls faster

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if getattr(self, f.name) < 0:
        raise ValueError(f"{f.name}={getattr(self, f.name)} must be >= 0")
    if self.hang_factor < 1:
      raise ValueError(f"hang_factor={self.hang_factor} must be >= 1")


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """Everything a backend needs to run one job (see launch/submit.py for each flag)."""

  config: str
  overrides: tuple[str, ...]
  workdir: str
  backend: str
  target: Target | None
  num_slices: int = 1
  capacity: str = "on-demand"
  num_processes: int = 1  # local backend only; the cloud backends use target.hosts x num_slices
  zone: str = ""
  project: str = ""
  cluster: str = ""  # gke
  kueue_queue: str = "multislice-queue"  # gke: xpk's LocalQueue name
  image: str = ""  # gke: container image with python + jax[tpu]; the wheel is installed on top
  allow_local_workdir: bool = False
  fingerprint: str = ""  # Experiment.fingerprint() of the resolved config ("" when not built)
  budgets: Budgets = Budgets()

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(f"backend={self.backend!r} must be one of {BACKENDS}")
    if self.capacity not in CAPACITIES:
      raise ValueError(f"capacity={self.capacity!r} must be one of {CAPACITIES}")
    if self.num_slices < 1:
      raise ValueError(f"num_slices={self.num_slices} must be >= 1")
    if self.num_processes < 1:
      raise ValueError(f"num_processes={self.num_processes} must be >= 1")
    if not self.workdir:
      raise ValueError("workdir is required")
    config_path = self.config.split(":", 1)[0]
    if not config_path.endswith(".py"):
      raise ValueError(f"config={self.config!r} must be a configs/NAME.py[:ARG] file")
    for o in self.overrides:
      if "=" not in o or o.startswith("-"):
        raise ValueError(f"override {o!r} must look like group.field=value")
    if self.backend == "local":
      if self.num_slices != 1:
        raise ValueError("the local backend runs one slice; drop --num_slices")
      if self.workdir.startswith("gs://"):
        raise ValueError("the local backend writes its logs to a local workdir; gs:// is for pods")
      return
    if self.target is None:
      raise ValueError(f"backend={self.backend} needs --target (e.g. v5p-256)")
    if not self.zone or not self.project:
      raise ValueError(f"backend={self.backend} needs --zone and --project")
    if not self.workdir.startswith("gs://") and not self.allow_local_workdir:
      raise ValueError(f"workdir={self.workdir!r}: pod hosts cannot see this machine's disk; use a "
                       "gs:// bucket (or --allow_local_workdir for a filesystem every host mounts)")
    if not os.path.normpath(config_path).startswith("configs" + os.sep):
      raise ValueError(f"config={self.config!r} must be under configs/ so it ships in the wheel")
    if self.backend == "gke" and not self.cluster:
      raise ValueError("backend=gke needs --cluster (a GKE cluster with TPU node pools, e.g. from "
                       "`xpk cluster create`)")
    if self.backend == "gke" and not self.image:
      raise ValueError("backend=gke needs --image (a container with python3.11+ and pip)")

  @property
  def run_id(self) -> str:
    """A name for cloud resources: lowercase, <= 40 characters, stable for a workdir."""
    base = re.sub(r"[^a-z0-9-]+", "-", self.workdir.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")
    digest = hashlib.sha256(self.workdir.rstrip("/").encode()).hexdigest()[:8]
    return f"rg-{base[:27]}-{digest}".replace("--", "-")

  @property
  def num_hosts(self) -> int:
    """Processes in the job (all slices)."""
    if self.backend == "local":
      return self.num_processes
    return self.target.hosts * self.num_slices

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "JobSpec":
    d: dict[str, Any] = json.loads(text)
    d["overrides"] = tuple(d["overrides"])
    d["target"] = Target(**d["target"]) if d["target"] else None
    d["budgets"] = Budgets(**d["budgets"])
    return cls(**d)

  def same_job(self, other: "JobSpec") -> bool:
    """Whether a re-submit with `other` continues this job: same config file, target and shape, and
    overrides that differ only where the trainer resumes anyway (its COMPATIBLE fields, e.g.
    extending train.steps; recurrentgemma_tpu/checkpoints/resume.py is the one rule)."""
    keys = ("config", "workdir", "backend", "target", "num_slices", "num_processes")
    if any(getattr(self, k) != getattr(other, k) for k in keys):
      return False
    if self.overrides == other.overrides:
      return True
    from recurrentgemma_tpu.checkpoints import resume  # pylint: disable=g-import-not-at-top
    changed, one_sided = resume.compare(_override_dict(self.overrides),
                                        _override_dict(other.overrides))
    return not changed and not one_sided


def _override_dict(overrides: Sequence[str]) -> dict[str, str]:
  """("group.field=value", ...) -> {"group.field": "value"} (the last one wins, as when applied)."""
  return dict(o.split("=", 1) for o in overrides)
