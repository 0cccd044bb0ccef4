"""Joining the processes of one job with `jax.distributed`, from the environment the launcher sets.

`launch/` (every backend) gives each host the same variables; `train.py` calls
`initialize_from_environment()` before anything touches a device:

  JAX_COORDINATOR_ADDRESS   host:port of process 0's coordination service
  JAX_NUM_PROCESSES         processes in the job (all slices together)
  JAX_PROCESS_ID            this process's index, 0..JAX_NUM_PROCESSES-1
  JAX_INITIALIZATION_TIMEOUT_SECONDS, JAX_HEARTBEAT_TIMEOUT_SECONDS   optional, see the defaults below

Explicit arguments (train.py's --coordinator_address/--num_processes/--process_id flags) override the
variables. Without a coordinator, a multi-host TPU VM (TPU_WORKER_HOSTNAMES with several hosts, or
MEGASCALE_COORDINATOR_ADDRESS) still initializes, through jax's own cluster detection.
"""

from __future__ import annotations

import os
from typing import Mapping

COORDINATOR = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"
INITIALIZATION_TIMEOUT = "JAX_INITIALIZATION_TIMEOUT_SECONDS"
HEARTBEAT_TIMEOUT = "JAX_HEARTBEAT_TIMEOUT_SECONDS"

# Hosts of a pod boot and install minutes apart, so process 0 waits long for the others (jax: 300 s).
DEFAULT_INITIALIZATION_TIMEOUT_S = 1800
# A host busy compiling a large program can miss the coordination heartbeat for minutes; jax's 100 s
# default kills such jobs (DEADLINE_EXCEEDED / heartbeat timeout). Real hangs are caught sooner by the
# launcher's watchdog on the trainer's heartbeat files.
DEFAULT_HEARTBEAT_TIMEOUT_S = 600


def _int_env(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} must be an integer") from None


def _multihost_tpu(env: Mapping[str, str]) -> bool:
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  return len(hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env


def initialize_kwargs(coordinator_address: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None, mode: str = "auto",
                      env: Mapping[str, str] | None = None) -> dict | None:
  """The arguments `initialize_from_environment` passes to `jax.distributed.initialize`.

  Returns None when the job is a single process (mode "off", or "auto" with no coordinator and no
  multi-host TPU environment).

  Raises:
    ValueError: an unknown mode, a malformed variable, or a process id outside the job.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"mode={mode!r} must be one of auto, on, off")
  env = os.environ if env is None else env
  coordinator = coordinator_address or env.get(COORDINATOR) or None
  if mode == "off" or (mode == "auto" and not coordinator and not _multihost_tpu(env)):
    return None
  num = num_processes if num_processes is not None else _int_env(env, NUM_PROCESSES)
  pid = process_id if process_id is not None else _int_env(env, PROCESS_ID)
  if coordinator and (num is None or pid is None):
    raise ValueError(f"coordinator {coordinator!r} given without the process count and id "
                     f"({NUM_PROCESSES}={num}, {PROCESS_ID}={pid})")
  if num is not None and pid is not None and not 0 <= pid < num:
    raise ValueError(f"process id {pid} is outside 0..{num - 1}")
  init_timeout = _int_env(env, INITIALIZATION_TIMEOUT)
  heartbeat_timeout = _int_env(env, HEARTBEAT_TIMEOUT)
  return dict(coordinator_address=coordinator, num_processes=num, process_id=pid,
              initialization_timeout=init_timeout or DEFAULT_INITIALIZATION_TIMEOUT_S,
              heartbeat_timeout_seconds=heartbeat_timeout or DEFAULT_HEARTBEAT_TIMEOUT_S)


def initialize_from_environment(coordinator_address: str | None = None,
                                num_processes: int | None = None, process_id: int | None = None,
                                mode: str = "auto") -> bool:
  """Calls `jax.distributed.initialize` when this process is one of several; True if it did."""
  kwargs = initialize_kwargs(coordinator_address, num_processes, process_id, mode)
  if kwargs is None:
    return False
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  # CPU processes need a collectives backend to form one computation; TPUs and GPUs ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d.", jax.process_index(), jax.process_count())
  return True
