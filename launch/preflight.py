"""Preflight: the only launch module that imports the project (and, through it, jax), lazily.

Before any pod time is spent: the config is built into an Experiment (all validation, no compile) for
the target's device count, then `python -m recurrentgemma_tpu.compile` compiles the real train step
for the target topology and slice count on this CPU host and says whether it fits. The verdict is
cached by (experiment fingerprint, topology, slices) under ~/.cache/recurrentgemma_tpu/fit/ (or
$RG_LAUNCH_CACHE), so re-submitting or sweeping the same config does not compile again. The
compiled train step is kept beside the verdict and shipped in the run directory (`ship_executable`):
the job's hosts load it instead of compiling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
from typing import Callable

from launch import spec as spec_lib
from recurrentgemma_tpu import exit_codes

@dataclasses.dataclass(frozen=True)
class FitCheck:
  fits: bool
  report: str
  cached: bool = False
  step_s: float | None = None  # the planner's predicted seconds per step (sharding/planner.py)
  executable: str | None = None  # the compiled train step (recurrentgemma_tpu/executable.py), if kept


# The fit check's compiled train step, beside its verdict (<key>.json) in cache_dir().
EXECUTABLE_SUFFIX = ".executable"


def cache_dir() -> str:
  return os.environ.get("RG_LAUNCH_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "recurrentgemma_tpu", "fit"))


def ship_executable(fit: FitCheck, workdir: str, log: Callable[[str], None]) -> bool:
  """Copies the fit check's compiled train step into the run directory (local or gs://), where
  every host of the job loads it instead of compiling (recurrentgemma_tpu/executable.py checks it
  was built for exactly that job). Returns whether a file was shipped."""
  from recurrentgemma_tpu import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if not fit.fits or not fit.executable:
    return False
  dst = workdir_lib.join(workdir, workdir_lib.EXECUTABLE_FILE)
  workdir_lib.copy(fit.executable, dst)
  log(f"shipped the compiled train step ({os.path.getsize(fit.executable) / 2**20:.1f} MiB) to {dst}")
  return True


def fit_cache_key(fingerprint: str, target: spec_lib.Target, num_slices: int) -> str:
  return hashlib.sha256(f"{fingerprint}|{target.topology_name}|{num_slices}".encode()).hexdigest()[:32]


def num_devices(spec: spec_lib.JobSpec) -> int:
  return spec.target.chips * spec.num_slices * spec.target.devices_per_chip


def fingerprint(spec: spec_lib.JobSpec) -> str:
  """Builds the Experiment for the target (every check, no compile); returns its fingerprint.

  Raises:
    ValueError / FileNotFoundError: the config is invalid for this target (the message names why).
  """
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  overrides = list(spec.overrides) + [f"mesh.num_slices={spec.num_slices}"]
  config = experiment_lib.load_config(spec.config, overrides)
  return experiment_lib.build(config, num_devices=num_devices(spec)).fingerprint()


def train_steps(spec: spec_lib.JobSpec) -> int:
  """The run's `config.train.steps` (with the overrides), for the cost estimate."""
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  return int(experiment_lib.load_config(spec.config, list(spec.overrides)).train.steps)


def store_check(spec: spec_lib.JobSpec) -> list[str]:
  """Checks the job's prepared data stores (config.data.store) before any pod exists (the check
  itself, data.store.check, imports no jax).

  Raises:
    ValueError (data.StoreError): a store is missing or was prepared for other settings; the
      message names it, the differing field and the prepare command.
  """
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu.data import config as data_config, store  # pylint: disable=g-import-not-at-top
  config = experiment_lib.load_config(spec.config, spec.overrides)
  args = [f"--config={spec.config}"] + [f"--config.{o}" for o in spec.overrides]
  return store.check(data_config.data_config_from(config), config_args=args)


def check_stores(trials, *, prepare_local: bool) -> int:
  """A sweep's data, once per distinct store for all its trials: prepared stores are checked;
  local-cache stores are prepared here when the trials run on this machine. Returns how many."""
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu.data import config as data_config, store  # pylint: disable=g-import-not-at-top
  seen = {}
  for t in trials:
    cfg = data_config.data_config_from(experiment_lib.load_config(t.spec, list(t.overrides)))
    seen.setdefault(store.identity(cfg), (t, cfg))
  for t, cfg in seen.values():
    args = [f"--config={t.spec}"] + [f"--config.{o}" for o in t.overrides]
    if cfg.store or not prepare_local:
      store.check(cfg, config_args=args)
    else:
      store.prepare_all(cfg)
  return len(seen)


def run_compile(argv: list[str], env: dict[str, str], timeout_s: float,
                log: Callable[[str], None]) -> tuple[int, str]:
  """Runs the compile CLI, passing each line of its output to `log` as it is printed.

  Returns (exit code, its whole output). The child runs unbuffered (PYTHONUNBUFFERED): through a pipe
  Python would otherwise hold its progress lines (`still compiling (1m30s)`) until it exits.
  """
  proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**env, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL)
  timer = threading.Timer(timeout_s, proc.kill)
  timer.start()
  lines = []
  try:
    for line in proc.stdout:
      line = line.rstrip("\n")
      lines.append(line)
      log(f"  | {line}")
    rc = proc.wait()
  finally:
    timer.cancel()
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return rc, "\n".join(lines)


def cached_fit_check(spec: spec_lib.JobSpec, fingerprint_hex: str) -> FitCheck | None:
  """The cached verdict of `fit_check` for this job on this machine, or None (nothing compiles)."""
  key = fit_cache_key(fingerprint_hex, spec.target, spec.num_slices)
  path = os.path.join(cache_dir(), f"{key}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    d = json.load(f)
  if "step_s" not in d:  # verdicts cached before the step time was kept are checked again
    return None
  executable = os.path.join(cache_dir(), f"{key}{EXECUTABLE_SUFFIX}")
  return FitCheck(d["fits"], d["report"], cached=True, step_s=d["step_s"],
                  executable=executable if os.path.exists(executable) else None)


def fit_check(spec: spec_lib.JobSpec, fingerprint_hex: str, *, log: Callable[[str], None] = print,
              timeout_s: float = 3 * 3600) -> FitCheck:
  """Ahead-of-time compile for the target, its output streamed to `log`; cached by fingerprint +
  topology + slices, with the planner's predicted step time (`step_s`)."""
  cached = cached_fit_check(spec, fingerprint_hex)
  if cached is not None:
    return cached
  key = fit_cache_key(fingerprint_hex, spec.target, spec.num_slices)
  path = os.path.join(cache_dir(), f"{key}.json")
  executable = os.path.join(cache_dir(), f"{key}{EXECUTABLE_SUFFIX}")
  os.makedirs(cache_dir(), exist_ok=True)
  summary_path = os.path.join(cache_dir(), f"{key}.report.{os.getpid()}.json")
  argv = ([sys.executable, "-m", "recurrentgemma_tpu.compile", f"--config={spec.config}",
           f"--topology={spec.target.topology_name}", f"--num_slices={spec.num_slices}",
           f"--report_json={summary_path}", f"--save_executable={executable}"]
          + [f"--config.{o}" for o in spec.overrides])
  log(f"fit check: compiling for {spec.target.topology_name} x {spec.num_slices} slice(s) "
      f"({spec.target.accelerator_type}) on this host...")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  rc, report = run_compile(argv, env, timeout_s, log)
  report = report.strip()
  # The TPU compiler itself may refuse a program too big for HBM (RESOURCE_EXHAUSTED, the CLI's
  # internal-error exit): that is a verdict, "does not fit", and is cached like one.
  out_of_memory = rc == exit_codes.INTERNAL and "RESOURCE_EXHAUSTED" in report
  if rc not in (exit_codes.OK, exit_codes.NO_FIT) and not out_of_memory:
    raise ValueError(f"fit check could not run ({exit_codes.describe(rc)}):\n{report[-4000:]}")
  try:
    with open(summary_path) as f:
      step_s = json.load(f).get("step_s")
    os.remove(summary_path)
  except (OSError, ValueError):
    step_s = None
  result = FitCheck(rc == exit_codes.OK, report, step_s=step_s,
                    executable=executable if os.path.exists(executable) else None)
  with open(path + f".tmp{os.getpid()}", "w") as f:
    json.dump({"fits": result.fits, "report": report, "topology": spec.target.topology_name,
               "num_slices": spec.num_slices, "fingerprint": fingerprint_hex, "step_s": step_s}, f)
  os.replace(path + f".tmp{os.getpid()}", path)
  return result
