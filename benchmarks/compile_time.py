r"""Where the CPU time of an ahead-of-time TPU compile goes.

    python benchmarks/compile_time.py --config=griffin_14b --topology=v5p:4x4x8 \
        [--config.data.global_batch_size=512] [--passes=25] [--dump_dir=/tmp/rg_dump] [--backend=20]

Builds the real train step exactly as `python -m recurrentgemma_tpu.compile` does, then times, in CPU
seconds (this process, all threads: `resource.getrusage`) and wall seconds:
  build   model / optimizer / shardings (`step_functions.build_step_functions`), no tracing;
  lower   tracing the step and lowering it to StableHLO;
  compile the TPU compiler in libtpu (`Lowered.compile`).
With `--passes=N` the compile also dumps XLA's module metadata (`xla_dump_module_metadata`: start and
end time of every HLO pass) and prints the N most expensive passes, summed by pass name over every
pipeline they ran in. It prints the sizes of the lowered and compiled programs too (the compile's work
grows with them), and libtpu's own stage durations from its log in /tmp/tpu_logs (HLO passes, backend
passes, code generation) with its slow-operation alarms. Only measures; asserts nothing.
"""

import collections
import glob
import os
import re
import resource
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

# Run as a script: the repository root (configs/, recurrentgemma_tpu/) must be importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: a file or a preset's name.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:4x4x8", "TPU topology.")
_PASSES = flags.DEFINE_integer("passes", 0, "Print the N most expensive HLO passes (0: no pass timing).")
_DUMP_DIR = flags.DEFINE_string("dump_dir", "/tmp/rg_compile_time_dump", "Where the pass metadata goes.")
_BACKEND = flags.DEFINE_integer("backend", 0, "Print the backend's time per kind of instruction and "
                                "the N slowest instructions (0: off).")


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


class _Timer:
  """Wall and CPU seconds of a `with` block."""

  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), _cpu_s()
    return self

  def __exit__(self, *exc):
    self.wall, self.cpu = time.perf_counter() - self.wall, _cpu_s() - self.cpu


def pass_times(dump_dir: str) -> dict[str, float]:
  """Seconds per HLO pass name, summed over every module metadata file in `dump_dir`."""
  totals: dict[str, float] = collections.defaultdict(float)
  for path in glob.glob(os.path.join(dump_dir, "*metadata.textproto")):
    text = open(path).read()
    for block in re.finditer(r"pass_metadata\s*\{(.*?)\n\s*\}", text, re.S):
      body = block.group(1)
      name = re.search(r'pass_name:\s*"([^"]+)"', body)
      start = re.search(r"start_timestamp_usec:\s*(\d+)", body)
      end = re.search(r"end_timestamp_usec:\s*(\d+)", body)
      if name and start and end:
        pipeline = re.search(r'pipeline_name:\s*"([^"]+)"', body)
        key = f"{name.group(1)} [{pipeline.group(1) if pipeline else '?'}]"
        totals[key] += (int(end.group(1)) - int(start.group(1))) / 1e6
  return dict(totals)


def libtpu_stages(log_dir: str = "/tmp/tpu_logs") -> list[str]:
  """libtpu's own stage durations (HLO_PASSES, BACKEND_PASSES, CODE_GENERATION, END_TO_END) and slow-
  operation alarms for this process, from its INFO log (libtpu writes one per process there)."""
  logs = sorted(glob.glob(os.path.join(log_dir, f"*.INFO.*.{os.getpid()}")), key=os.path.getmtime)
  if not logs:
    return []
  out = []
  with open(logs[-1], errors="replace") as f:
    for line in f:
      m = re.search(r"(\w+) stage duration: (.*)$", line)
      if m:
        out.append(f"{m.group(1)}: {m.group(2)} (wall)")
      elif "The operation took" in line or "Successful retry compilation of" in line:
        out.append(line.split("] ", 1)[-1].strip())
  return out


_EMIT = re.compile(r"emitting for (\S+) time: ([\d.]+) (ms|us|s) ")
_LLO = re.compile(r"\[(\S+)\] LLO optimizing ([\d,]+) instructions")
_RETRY = re.compile(r"Successful retry compilation of (\S+) after")
_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def _kind(name: str, hlo_op: str) -> str:
  """A coarse kind for an instruction the backend lowered, from its HLO name and opcode/calls."""
  base = re.sub(r"\.\d+$", "", name)
  if base.startswith(("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")):
    return "collective (" + base + ")"
  if "convolution" in hlo_op or "convolution" in base:
    return "matmul fusion (convolution inside)"
  if base in ("copy", "sort", "scatter", "gather", "dynamic-update-slice", "reduce-window"):
    return base
  if base.startswith("linear_scan") or "custom-call" in hlo_op:
    return "custom call (Pallas kernel)"
  if base == "multiply_reduce_fusion":
    return "multiply_reduce_fusion (optimizer update + norm)"
  return "other fusion"


def backend_times(log_dir: str = "/tmp/tpu_logs"
                  ) -> tuple[dict[str, float], list[str], dict[str, int]]:
  """Backend seconds per lowered instruction (summed over retries), the retried names and the LLO
  instructions each was lowered to (summed over retries), from libtpu's INFO log of this process
  (written with `--vmodule=lowering_emitter=1,deepsea_compiler_backend=1`)."""
  logs = sorted(glob.glob(os.path.join(log_dir, f"*.INFO.*.{os.getpid()}")), key=os.path.getmtime)
  times: dict[str, float] = collections.defaultdict(float)
  llo: dict[str, int] = collections.defaultdict(int)
  retried = []
  if logs:
    with open(logs[-1], errors="replace") as f:
      for line in f:
        m = _EMIT.search(line)
        if m:
          times[m.group(1)] += float(m.group(2)) * _UNITS[m.group(3)]
        m = _LLO.search(line)
        if m:
          llo[m.group(1)] += int(m.group(2).replace(",", ""))
        m = _RETRY.search(line)
        if m:
          retried.append(m.group(1))
  return dict(times), retried, dict(llo)


def _print_backend(times: dict[str, float], retried: list[str], llo: dict[str, int], hlo: str,
                   top: int) -> None:
  ops = {}
  for m in re.finditer(r"%([\w.\-]+) = [^\n]*? ([a-z\-]+)\((?:[^\n]*?calls=%([\w.\-]+))?", hlo):
    ops[m.group(1)] = m.group(2) + " " + (m.group(3) or "")
  # A fusion's kind shows in its called computation: look for a convolution inside it.
  comps = dict(re.findall(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S))
  kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for name, s in times.items():
    op = ops.get(name, "")
    called = op.split(" ")[-1]
    if "convolution(" in comps.get(called, ""):
      op += " convolution"
    k = kinds[_kind(name, op)]
    k[0] += s
    k[1] += 1
  total = sum(times.values())
  print(f"backend (libtpu lowering_emitter log, wall s on its compile threads): {total:.1f} s over "
        f"{len(times)} instructions; retried: {', '.join(retried) or 'none'}")
  # Unlike the times, the LLO instruction count does not depend on the load; the backend's time
  # per instruction tracks it (correlation 0.89 over the Griffin-14B step's 421 instructions).
  print(f"LLO instructions the backend optimised: {sum(llo.values()):,} (retries included)")
  for kind, (s, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
    print(f"  {s:8.1f} s {100 * s / max(total, 1e-9):5.1f}%  {n:4d} x {kind}")
  print(f"slowest {top}:")
  for name, s in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
    print(f"  {s:8.2f} s  {name}  ({ops.get(name, '?').strip()})")


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _BACKEND.value:
    # libtpu reads its flags once, when jax first starts the TPU backend: set them before that.
    os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "") +
                                      " --vmodule=lowering_emitter=1,deepsea_compiler_backend=1"
                                      ).strip()
  import jax  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import step_functions  # pylint: disable=g-import-not-at-top
  from sharding import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from sharding import planner  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  rows = []
  with _Timer() as t:
    chip, devices, _ = planner.topology_devices(_TOPOLOGY.value, int(config.mesh.num_slices))
    exp = experiment_lib.build(config, num_devices=len(devices))
    mesh = mesh_lib.create_mesh(exp.mesh, devices)
    fns = step_functions.build_step_functions(exp.model, exp.optimizer, mesh, exp.mesh.strategy)
  rows.append(("build", t))
  batch, seq_len = exp.data.global_batch_size, exp.data.seq_len
  with _Timer() as t:
    lowered = fns.lower_train_step(batch, seq_len)
  rows.append(("lower", t))
  options = {}
  if _PASSES.value:
    os.makedirs(_DUMP_DIR.value, exist_ok=True)
    for f in glob.glob(os.path.join(_DUMP_DIR.value, "*")):
      os.remove(f)
    options = {"xla_dump_to": _DUMP_DIR.value, "xla_dump_module_metadata": True,
               "xla_dump_hlo_module_re": "jit_train", "xla_dump_hlo_as_text": False}
  with _Timer() as t:
    compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
  rows.append(("compile", t))

  mesh_str = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
  print(f"{config.model.family if 'family' in config.model else ''} on {_TOPOLOGY.value} ({chip.name}), "
        f"mesh {mesh_str}, batch {batch} x {seq_len}, jax {jax.__version__}, load {os.getloadavg()[0]:.1f}")
  print(f"{'phase':<8} {'cpu s':>8} {'wall s':>8}")
  for name, t in rows:
    print(f"{name:<8} {t.cpu:>8.1f} {t.wall:>8.1f}")
  print(f"{'total':<8} {sum(t.cpu for _, t in rows):>8.1f} {sum(t.wall for _, t in rows):>8.1f}")
  stablehlo, hlo = lowered.as_text(), compiled.as_text()
  print(f"lowered StableHLO: {len(stablehlo) / 1e6:.1f} MB, {stablehlo.count(chr(10))} lines; "
        f"compiled HLO: {len(hlo) / 1e6:.1f} MB, {hlo.count(chr(10))} lines, "
        f"{hlo.count(' while(')} while loops, {hlo.count(' custom-call(')} custom calls")
  stages = libtpu_stages()
  if stages:
    print("libtpu compile stages (its own log):")
    for line in stages:
      print(f"  {line}")
  if _BACKEND.value:
    _print_backend(*backend_times(), hlo, _BACKEND.value)
  if _PASSES.value:
    times = pass_times(_DUMP_DIR.value)
    if not times:
      print(f"no pass metadata found in {_DUMP_DIR.value}")
    else:
      total = sum(times.values())
      print(f"HLO passes (wall, summed by name; nested pipelines overlap): {total:.1f} s over "
            f"{len(times)} names; top {_PASSES.value}:")
      for name, s in sorted(times.items(), key=lambda kv: -kv[1])[:_PASSES.value]:
        print(f"  {s:8.2f} s  {name}")
  return 0


if __name__ == "__main__":
  # Preset names (`--config=griffin_14b`) resolve as in every command of the project.
  app.run(lambda argv: sys.exit(main(argv)), argv=cli.rewrite_config_args(sys.argv))
