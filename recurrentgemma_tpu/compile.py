r"""Ahead-of-time compile and fit check of the real train step for a TPU topology, on a CPU host.

    python -m recurrentgemma_tpu.compile --config=griffin_14b --topology=v5p:4x4x8 \
        [--num_slices=N] [--mesh=DATA,FSDP,SEQ,MODEL] [--strategy=griffin] [--remat=block] \
        [--batch=512] [--seq_len=2048] [--microbatches=4] [--scan_impl=pallas_tpu] [--arrays] \
        [--save_executable=PATH] [--search] [--config.KEY=VALUE ...]

Validates the experiment with `experiment.build` for the topology's device count (the checks a
training run makes), builds exactly what the training loop runs (`step_functions.build_step_functions`:
model, optimizer, Pallas kernels, shardings, donated state) for its TPU devices, compiles it with the
TPU compiler through libtpu, prints per-chip memory against the chip's HBM and the compiled FLOPs
against 6 x params x tokens (and the model FLOPs of `model/flops.py`), and exits 0 only when it fits
(4, exit_codes.NO_FIT, when it does not; 2 on a bad request).
`--search` tries mesh factorisations x remat policies x micro-batch counts, compiles them in order of
estimated step time, and prints the fitting plans ranked (exit 0 when at least one fits).
"""

import glob
import json
import os
import sys
from typing import Any, Optional, Sequence

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from recurrentgemma_tpu import cli
from recurrentgemma_tpu import exit_codes
from sharding import planner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: configs/NAME.py[:ARG] or "
                                          "a preset's NAME.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x8 or v5e:16x16.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", None, "Slices over DCN (default: config.mesh.num_slices).")
_MESH = flags.DEFINE_string("mesh", None, "Override mesh sizes within a slice as DATA,FSDP,SEQ,MODEL "
                            "(one may be -1).")
_STRATEGY = flags.DEFINE_string("strategy", None, "Override config.mesh.strategy.")
_REMAT = flags.DEFINE_string("remat", None, "Override config.model.remat.")
_BATCH = flags.DEFINE_integer("batch", None, "Override config.data.global_batch_size (sequences).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Override config.data.seq_len.")
_MICRO = flags.DEFINE_integer("microbatches", None, "Override config.optimizer.num_microbatches.")
_SCAN_IMPL = flags.DEFINE_string(
    "scan_impl", None, "Override config.model.scan_impl. 'auto' (the presets' value) resolves when the "
    "program is lowered, so compiling for a TPU topology already uses the Pallas TPU kernel.")
_MAX_HBM = flags.DEFINE_float("max_hbm_fraction", 0.95, "Fits when total per-chip memory <= this "
                              "fraction of HBM (headroom for the runtime and fragmentation).")
_ARRAYS = flags.DEFINE_bool("arrays", False, "Print every state array's logical axes, sharding and "
                            "per-device bytes.")
_DUMP_HLO = flags.DEFINE_string("dump_hlo", None, "Write the compiled HLO text to this path.")
_REPORT_JSON = flags.DEFINE_string(
    "report_json", None, "Also write the verdict as JSON to this path: fits, per-chip bytes and the "
    "step-time model's predicted seconds per step (what launch.submit's cost estimate uses).")
_SAVE_EXECUTABLE = flags.DEFINE_string(
    "save_executable", None, "Also serialize the compiled train step, with what it was built for, to "
    "this path (local or gs://): the launcher ships it in the run directory and the job's hosts load "
    "it instead of compiling (recurrentgemma_tpu/executable.py).")
_SEARCH = flags.DEFINE_bool("search", False, "Search mesh x remat x micro-batches for fitting plans.")
_SEARCH_REMATS = flags.DEFINE_list("search_remat", ["block", "dots", "none"], "Remat policies to try.")
_SEARCH_MICRO = flags.DEFINE_list("search_microbatches", ["1", "2", "4", "8", "16"], "Micro-batch counts.")
_SEARCH_MAX_MODEL = flags.DEFINE_integer("search_max_model", 16, "Largest `model` axis to try.")
_SEARCH_MAX_SEQ = flags.DEFINE_integer("search_max_seq", 1, "Largest `seq` axis to try.")
_SEARCH_COMPILES = flags.DEFINE_integer("search_max_compiles", 6, "Most plans to compile.")
_SEARCH_WANT = flags.DEFINE_integer("search_want", 3, "Stop after this many fitting plans.")


def apply_overrides(config: Any) -> None:
  """Writes the short command-line overrides into the (locked) config."""
  if _MESH.value is not None:
    parts = _MESH.value.split(",")
    if len(parts) != 4:
      raise ValueError(f"--mesh={_MESH.value!r} must be DATA,FSDP,SEQ,MODEL (4 integers, one may be -1)")
    try:
      sizes = [int(p) for p in parts]
    except ValueError as e:
      raise ValueError(f"--mesh={_MESH.value!r} must be 4 integers") from e
    config.mesh.data, config.mesh.fsdp, config.mesh.seq, config.mesh.model = sizes
  overrides = ((_NUM_SLICES, config.mesh, "num_slices"), (_STRATEGY, config.mesh, "strategy"),
               (_REMAT, config.model, "remat"), (_BATCH, config.data, "global_batch_size"),
               (_SEQ_LEN, config.data, "seq_len"), (_MICRO, config.optimizer, "num_microbatches"),
               (_SCAN_IMPL, config.model, "scan_impl"))
  for flag, group, key in overrides:
    if flag.value is not None:
      group[key] = flag.value


def compile_experiment(exp: Any, topology: str, *, max_hbm_fraction: float = 0.95,
                       print_arrays: bool = False, dump_hlo: Optional[str] = None,
                       save_executable: Optional[str] = None, log=print) -> planner.CompileReport:
  """Compiles `exp`'s train step for `topology` (x exp.mesh.num_slices) and reports per chip.

  `exp` is an `experiment.Experiment` built for this topology's device count, so every check
  (mesh shape, strategy, batch split) has already run. `save_executable`: a path the compiled
  step is serialized to with its signature (`executable.save`), for the job's hosts to load.
  """
  from recurrentgemma_tpu import step_functions  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu.model import flops  # pylint: disable=g-import-not-at-top
  from sharding import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  num_slices = exp.mesh.num_slices
  chip, devices, per_chip = planner.topology_devices(topology, num_slices)
  if len(devices) != exp.num_devices:
    raise ValueError(f"the experiment was built for {exp.num_devices} devices but {topology} x "
                     f"{num_slices} slices has {len(devices)}")
  mesh = mesh_lib.create_mesh(exp.mesh, devices)
  with cli.phase("building the train step (model, optimizer, shardings)", log):
    fns = step_functions.build_step_functions(exp.model, exp.optimizer, mesh, exp.mesh.strategy)
  num_params, _ = flops.param_counts(exp.model)
  if print_arrays:
    log(fns.state_report()[1])
  log(f"model FLOPs per step (model/flops.py): "
      f"{flops.training_flops_per_token(exp.model, exp.data.seq_len) * exp.tokens_per_step:.4g}")
  with cli.phase("lowering to StableHLO", log):
    lowered = fns.lower_train_step(exp.data.global_batch_size, exp.data.seq_len)
  with cli.phase(f"compiling for {topology} x {num_slices} slice(s) with the TPU compiler", log) as p:
    compiled = lowered.compile()
  seconds = p.seconds
  if save_executable:
    from recurrentgemma_tpu import executable  # pylint: disable=g-import-not-at-top
    with cli.phase(f"serializing the executable to {save_executable}", log):
      size = executable.save(save_executable, compiled,
                             executable.signature(lowered, mesh, exp.fingerprint()))
    log(f"executable: {size / 2**20:.1f} MiB")
  if dump_hlo:
    with open(dump_hlo, "w") as f:
      f.write(compiled.as_text())
  return planner.analyze(compiled, topology=topology, num_slices=num_slices, chip=chip,
                         devices_per_chip=per_chip, mesh=dict(mesh.shape),
                         six_nd=6.0 * num_params * exp.tokens_per_step,
                         max_hbm_fraction=max_hbm_fraction, compile_seconds=seconds)


def search_experiment(exp: Any, topology: str, *, remats: Sequence[str], microbatches: Sequence[int],
                      max_model: int, max_seq: int, max_compiles: int, want: int,
                      max_hbm_fraction: float = 0.95, log=print) -> list[planner.SearchResult]:
  """Ranks and compiles plans (mesh x remat x micro-batches) for `exp` on `topology`.

  Each plan is `exp` with its mesh, remat and micro-batch fields replaced and built again, so a plan
  passes exactly the checks a training run would.
  """
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu.model import flops  # pylint: disable=g-import-not-at-top
  from sharding import rules as rules_lib  # pylint: disable=g-import-not-at-top

  num_slices = exp.mesh.num_slices
  chip, devices, per_chip = planner.topology_devices(topology, num_slices)
  mc, data = exp.model, exp.data
  logical = model_lib.param_logical_axes(mc)
  shapes = jax.eval_shape(lambda: model_lib.init_params(mc, jax.random.key(0)))
  num_params, _ = flops.param_counts(mc)
  stats = planner.ModelStats(
      num_params=num_params, width=mc.width, num_layers=mc.num_layers, vocab_size=mc.vocab_size,
      matmul_flops_per_token=flops.forward_flops_per_token(mc, data.seq_len).total,
      global_batch=data.global_batch_size, seq_len=data.seq_len,
      param_bytes=jax.numpy.dtype(mc.parameter_dtype).itemsize,
      opt_bytes_per_param=4 + (2 if exp.optimizer.mu_dtype == "bfloat16" else 4))
  strategy = exp.mesh.strategy
  rules = rules_lib.rules_for(strategy)

  def valid(plan: planner.Plan) -> Optional[str]:
    # Parameters against the plan's mesh, on a device-free mesh of the right sizes.
    sizes = {"slice": num_slices, "data": plan.data, "fsdp": plan.fsdp, "seq": plan.seq, "model": plan.model}
    try:
      rules_lib.check_strategy_mesh(strategy, sizes)
      abstract = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
      rules_lib.tree_shardings(logical, abstract, rules, shapes=shapes)
    except ValueError as e:
      return str(e).splitlines()[0] + (" " + str(e).splitlines()[1].strip() if "\n" in str(e) else "")
    return None

  per_slice = len(devices) // num_slices
  plans, rejected = planner.candidate_plans(per_slice, num_slices, data.global_batch_size, data.seq_len,
                                            remats, microbatches, max_model=max_model, max_seq=max_seq,
                                            valid=valid)
  for why in rejected:
    log(f"  rejected {why}")
  if not plans:
    raise ValueError(f"no candidate plan for {len(devices)} devices, batch {data.global_batch_size}, "
                     f"seq_len {data.seq_len}")

  def compile_plan(plan: planner.Plan) -> planner.CompileReport:
    trial = experiment_lib.replace(exp, (
        f"mesh.data={plan.data}", f"mesh.fsdp={plan.fsdp}", f"mesh.seq={plan.seq}",
        f"mesh.model={plan.model}", f"model.remat={plan.remat}",
        f"optimizer.num_microbatches={plan.num_microbatches}"))
    return compile_experiment(trial, topology, max_hbm_fraction=max_hbm_fraction, log=log)

  estimate = lambda p: planner.estimate_step(p, stats, chip, num_slices, per_chip)
  log(f"{len(plans)} candidate plans; compiling up to {max_compiles} in order of estimated step time")
  return planner.search(plans, estimate, compile_plan, max_hbm_fraction * chip.hbm_bytes * per_chip,
                        max_compiles=max_compiles, want=want, log=log)


def _topology_devices(topology: str, num_slices: int) -> list[Any]:
  """The topology's devices; a topology libtpu refuses, or no libtpu, is a user error."""
  from sharding import chips  # pylint: disable=g-import-not-at-top
  chips.parse_topology(topology)  # the form and the chip generation, before libtpu starts
  try:
    if not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*"):
      # Not a TPU VM: libtpu's metadata guess would put a warning text in this variable and then
      # print an INVALID_ARGUMENT line about it (harmless for an ahead-of-time compile).
      os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    return planner.topology_devices(topology, num_slices)[1]
  except (RuntimeError, jax.errors.JaxRuntimeError) as e:
    message = cli.one_line(e)
    if "TPU support not installed" in message or "libtpu" in message.lower():
      raise cli.exit_codes.UserError(
          f"compiling for --topology={topology} needs libtpu, which is not installed "
          "(pip install -e \".[tpu]\")") from e
    raise cli.exit_codes.UserError(
        f"--topology={topology}: libtpu refused it: {message} (a slice is whole hosts, e.g. "
        "v5e:2x2, v5e:4x4, v5e:16x16, v5p:2x2x1, v5p:4x4x8)") from e


def main(argv: Sequence[str]) -> int:
  del argv  # cli.run refuses positional arguments
  if _CONFIG.value is None or _TOPOLOGY.value is None:
    raise app.UsageError("--config and --topology are required")
  config = cli.load_config_flag(_CONFIG)
  try:
    apply_overrides(config)
    devices = _topology_devices(_TOPOLOGY.value, int(config.mesh.num_slices))
    from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
    exp = experiment_lib.build(config, num_devices=len(devices))
    print(cli.format_block("compile", cli.experiment_rows(exp) + [
        ("target", f"{_TOPOLOGY.value} x {exp.mesh.num_slices} slice(s) = {len(devices)} devices, "
                   f"mesh {' '.join(f'{k}={v}' for k, v in exp.mesh_shape.items() if v != 1)}")]),
          flush=True)
    if _SEARCH.value:
      results = search_experiment(
          exp, _TOPOLOGY.value, remats=_SEARCH_REMATS.value,
          microbatches=[int(m) for m in _SEARCH_MICRO.value], max_model=_SEARCH_MAX_MODEL.value,
          max_seq=_SEARCH_MAX_SEQ.value, max_compiles=_SEARCH_COMPILES.value, want=_SEARCH_WANT.value,
          max_hbm_fraction=_MAX_HBM.value)
      print(planner.format_search(results))
      return exit_codes.OK if any(r.status == "fits" for r in results) else exit_codes.NO_FIT
    report = compile_experiment(exp, _TOPOLOGY.value, max_hbm_fraction=_MAX_HBM.value,
                                print_arrays=_ARRAYS.value, dump_hlo=_DUMP_HLO.value,
                                save_executable=_SAVE_EXECUTABLE.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(planner.format_report(report))
  if _REPORT_JSON.value:
    with open(_REPORT_JSON.value, "w") as f:
      json.dump(planner.report_summary(report), f)
  return exit_codes.OK if report.fits else exit_codes.NO_FIT


def run() -> None:
  """Console-script entry point (`rg-compile`)."""
  flags.mark_flags_as_required(["config", "topology"])
  cli.run(main, __doc__, codes="exit codes: 0 fits, 4 does not fit, 2 bad request (one line), 1 an "
                               "internal error (with its traceback).")


if __name__ == "__main__":
  run()
