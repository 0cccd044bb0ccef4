r"""Time to first step of a local job: cold, with a shipped executable, with a warm compilation cache.

  python benchmarks/startup.py [--config=configs/tiny.py] [--devices=8] [--steps=2] \
      [--config.K=V ...]

Runs the same job through the local backend (`python -m launch.submit --backend=local`, one process)
in three fresh run directories and times each from the submit to the job's first train record in
metrics.jsonl (log_every=1):
  cold     nothing shipped, the run's compilation cache empty: every program compiles;
  shipped  the train step compiled beforehand and shipped into the run directory as the fit check
           does (`preflight.ship_executable`); the job loads it (recurrentgemma_tpu/executable.py);
  cache    the cold run's compilation cache copied into the run directory, as a restart or a
           re-submission finds it: every program is loaded from it.
The data stores are prepared first, so no row pays for them. The mechanism is the one a pod's hosts
use; only the devices differ. Wall-clock on a shared host moves with its load: run when it is quiet.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args() -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--devices", type=int, default=8, help="virtual CPU devices of the job")
  parser.add_argument("--steps", type=int, default=2, help="train.steps of each job")
  parser.add_argument("--keep", action="store_true", help="keep the run directories")
  args, rest = parser.parse_known_args()
  overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unknown arguments {unknown}")
  return args, overrides + [f"train.steps={args.steps}", "train.log_every=1", "train.eval_every=0",
                            f"checkpoint.save_every={args.steps}"]


def _first_step_seconds(argv: list[str], workdir: str, env: dict[str, str]) -> tuple[float, float]:
  """(seconds from start to the first train record, seconds to the job's end)."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  start = time.perf_counter()
  proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
  first = None
  while proc.poll() is None:
    if first is None and os.path.exists(metrics):
      with open(metrics) as f:
        if '"split": "train"' in f.read():
          first = time.perf_counter() - start
    time.sleep(0.1)
  end = time.perf_counter() - start
  if proc.returncode != 0 or first is None:
    raise SystemExit(f"the job in {workdir} failed (exit {proc.returncode}); see {workdir}/logs")
  return first, end


def _entries(workdir: str) -> int:
  """Programs in the run's compilation cache (each compile adds one; jax never rewrites one)."""
  cache = os.path.join(workdir, "compilation_cache")
  return len([n for n in os.listdir(cache) if n.endswith("-cache")]) if os.path.isdir(cache) else 0


def _train_step_source(workdir: str) -> str:
  with open(os.path.join(workdir, "logs", "process_0.log")) as f:
    text = f.read()
  for source in ("shipped", "refused", "compiled"):
    if f"Train step: {source}." in text:
      return source
  return "?"


def main() -> None:
  args, overrides = _args()
  env = {k: v for k, v in os.environ.items() if k != "RECURRENTGEMMA_TPU_COMPILATION_CACHE"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
  os.environ.update(env)  # this process builds the shipped executable for the job's devices
  import jax  # pylint: disable=g-import-not-at-top
  from launch import preflight  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import data as data_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import executable  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import step_functions  # pylint: disable=g-import-not-at-top
  from sharding import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)

  exp = experiment_lib.build(experiment_lib.load_config(args.config, overrides))
  data_lib.make_pipeline(exp.data).close()  # prepares the stores once, outside every timing
  root = tempfile.mkdtemp(prefix="rg_startup_")
  workdirs = {name: os.path.join(root, name) for name in ("cold", "shipped", "cache")}

  t = time.perf_counter()
  fns = step_functions.build_step_functions(exp.model, exp.optimizer, mesh_lib.create_mesh(exp.mesh),
                                            exp.mesh.strategy)
  path = os.path.join(root, "train_step.executable")
  _, size = executable.compile_and_save(fns, exp, path)
  compile_s = time.perf_counter() - t
  preflight.ship_executable(preflight.FitCheck(True, "", executable=path), workdirs["shipped"],
                            log=lambda s: None)

  argv = [sys.executable, "-m", "launch.submit", "--backend=local", f"--config={args.config}",
          "--progress_every=3600"] + [f"--config.{o}" for o in overrides]
  rows = []
  for name, workdir in workdirs.items():
    if name == "cache":
      shutil.copytree(os.path.join(workdirs["cold"], "compilation_cache"),
                      os.path.join(workdir, "compilation_cache"))
    load = os.getloadavg()[0]
    before = _entries(workdir)
    first, end = _first_step_seconds(argv + [f"--workdir={workdir}"], workdir, env)
    rows.append((name, first, end, _train_step_source(workdir), _entries(workdir) - before, load))
  print(f"config {args.config} {' '.join(overrides)}; {args.devices} CPU devices; jax {jax.__version__}")
  print(f"shipped executable: built in {compile_s:.1f} s (lower + compile + serialize, off the job), "
        f"{size / 2**20:.2f} MiB")
  print("| start | first step (s) | whole job (s) | train step | programs compiled | load at start |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name, first, end, source, compiled, load in rows:
    print(f"| {name} | {first:.1f} | {end:.1f} | {source} | {compiled} | {load:.1f} |")
  if args.keep:
    print(f"run directories kept in {root}")
  else:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
