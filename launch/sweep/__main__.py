r"""Scaling sweeps: run, watch, collect, fit and plot.

  python -m launch.sweep run|status|collect|fit|plot --sweep=configs/sweeps/NAME.py --root=DIR_OR_GS_URL \
      [--backend=local|tpu_vm|gke] [--targets=v5p-8,v5p-16,...] [--launch_flags="--zone=.. --project=.."] \
      [--parallel=N] [--only=TRIAL_IDS] [--predict=FLOPS]

run      claims and runs every unfinished trial (resumes interrupted ones, retries failed ones within
         the definition's `retries`); several drivers may share one root. Exit 0 all done, 1 some
         failed, 42 stopped by a signal (rerun to continue). --dry_run [--prices=FILE] prints each
         trial's target, chip-hours and cost and the totals, and runs nothing.
status   each trial's state, step and ETA.
collect  ROOT/results.{csv,jsonl} and a TensorBoard HParams log under ROOT/hparams;
         --downstream=TASKS first evaluates finished trials on lm-eval tasks (needs the eval extra).
fit      per family L(C) = E + A C^-alpha (and L(N, D) when both vary), bootstrap intervals, hold-out
         check; ROOT/fit.json. --predict=FLOPS prints and records the predicted loss at that budget;
         --target_loss=L the budget that reaches L; with --prices=FILE --target=T --mfu=X
         [--capacity=K --num_slices=S] the cost of each budget.
plot     PNG figures under ROOT/plots (needs the `sweep` extra: matplotlib).
"""

from __future__ import annotations

import os
import shlex

from absl import app
from absl import flags

from recurrentgemma_tpu import exit_codes

COMMANDS = ("run", "status", "collect", "fit", "plot")

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep definition, configs/sweeps/NAME.py[:ARG].")
_ROOT = flags.DEFINE_string("root", None, "Sweep root (local directory or gs://).")
_BACKEND = flags.DEFINE_enum("backend", "local", ["local", "tpu_vm", "gke"], "launch backend.")
_TARGET = flags.DEFINE_string("target", "", "tpu_vm/gke: --target of every trial (e.g. v5p-8).")
_TARGETS = flags.DEFINE_string(
    "targets", "", "tpu_vm/gke: candidate targets, comma-separated (default: the definition's "
    "`targets`); each trial runs on the smallest one its ahead-of-time compile fits.")
_LAUNCH_FLAGS = flags.DEFINE_string(
    "launch_flags", "", "More launch.submit flags for every trial, e.g. \"--zone=us-east5-a "
    "--project=P --capacity=spot\".")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Trials this driver runs at once.")
_ONLY = flags.DEFINE_string("only", "", "Comma-separated trial id prefixes (default: all).")
_TTL = flags.DEFINE_float("lease_ttl", 300.0, "Seconds without a heartbeat before a lease is stale.")
_MAX_RESTARTS = flags.DEFINE_integer("max_restarts", 3, "Relaunches after exit 42 per lease.")
_TRIAL_COMMAND = flags.DEFINE_string(
    "trial_command", "", "Replace the launcher by this command template ({workdir} {id} {spec} "
    "{root}); for tests.")
_PREDICT = flags.DEFINE_float("predict", 0.0, "fit: predict the loss of each family at this many "
                              "training FLOPs and record it under ROOT/predictions.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 300, "fit: bootstrap resamples.")
_STARTS = flags.DEFINE_integer("starts", 32, "fit: optimizer starts per fit.")
_DOWNSTREAM = flags.DEFINE_string(
    "downstream", "", "collect: lm-eval tasks to evaluate each finished trial on first "
    "(comma-separated; e.g. rg_stdlib); scores already in a trial's workdir are reused.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "run: print each trial's target, chip-hours and cost "
                             "(with --prices) and the totals; submit and write nothing.")
_PRICES = flags.DEFINE_string("prices", None, "run --dry_run, fit: price table (YAML or JSON) for "
                              "the cost (configs/prices/example.yaml; docs/launch.md, \"Cost\").")
_TARGET_LOSS = flags.DEFINE_float("target_loss", 0.0, "fit: print each family's compute budget to "
                                  "reach this loss (and its cost with --prices).")
_MFU = flags.DEFINE_float("mfu", 0.0, "fit --prices: the fraction of the chip's bf16 peak the run "
                          "would achieve (e.g. the planner's MFU from the fit check's report).")
_CAPACITY = flags.DEFINE_string("capacity", "on-demand", "fit --prices: capacity kind priced.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "fit --prices: slices of --target.")
_DOWNSTREAM_LIMIT = flags.DEFINE_integer("downstream_limit", 0, "collect: documents per task (0: all).")


def _fit_pricing():
  """fit with --prices: FLOPs -> the cost line (launch/cost.py); the table and target checked first."""
  if not _PRICES.value:
    return None
  from launch import cost  # pylint: disable=g-import-not-at-top
  from launch import spec as spec_lib  # pylint: disable=g-import-not-at-top
  if not _TARGET.value or not _MFU.value:
    raise exit_codes.UserError("fit --prices needs --target (the slice to price, e.g. v5p-256) and "
                               "--mfu (the fraction of peak the run would achieve, e.g. 0.4)")
  try:
    prices, target = cost.load(_PRICES.value), spec_lib.parse_target(_TARGET.value)
    if _CAPACITY.value not in spec_lib.CAPACITIES:
      raise ValueError(f"--capacity={_CAPACITY.value!r} must be one of {', '.join(spec_lib.CAPACITIES)}")
    cost.compute_cost(1.0, target, _NUM_SLICES.value, _CAPACITY.value, _MFU.value, prices)
  except ValueError as e:
    raise exit_codes.UserError(str(e)) from e
  return lambda flops: cost.format_compute(cost.compute_cost(
      flops, target, _NUM_SLICES.value, _CAPACITY.value, _MFU.value, prices))


def main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m launch.sweep {{{'|'.join(COMMANDS)}}} --sweep=... --root=...")
  if not _SWEEP.value or not _ROOT.value:
    raise app.UsageError("--sweep and --root are required")
  command, root = argv[1], _ROOT.value.rstrip("/")
  if command in ("fit", "plot"):
    # Before numpy loads: the fits are thousands of tiny problems, for which a multi-threaded BLAS
    # on a busy machine is ~10x slower than one thread.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
      os.environ.setdefault(var, "1")
  from launch.sweep import definition  # pylint: disable=g-import-not-at-top
  try:
    sweep = definition.load_sweep(_SWEEP.value)
  except ValueError as e:
    raise exit_codes.UserError(str(e)) from e
  if command == "plot":
    try:
      import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise exit_codes.UserError("plot needs matplotlib, from the sweep extra: "
                                 "pip install -e '.[sweep]'") from e
    from launch.sweep import plot  # pylint: disable=g-import-not-at-top
    for path in plot.plot_all(root, sweep):
      print(path)
    return exit_codes.OK
  if command == "fit":
    from launch.sweep import fit  # pylint: disable=g-import-not-at-top
    return fit.main(root, sweep, predict=_PREDICT.value, n_bootstrap=_BOOTSTRAP.value,
                    n_starts=_STARTS.value, target_loss=_TARGET_LOSS.value, pricing=_fit_pricing())
  try:
    trials = definition.select(definition.expand(sweep), _ONLY.value)
  except ValueError as e:
    raise exit_codes.UserError(str(e)) from e
  if command == "run":
    from launch.sweep import runner  # pylint: disable=g-import-not-at-top
    from launch import spec as spec_lib  # pylint: disable=g-import-not-at-top
    from launch.sweep import targets  # pylint: disable=g-import-not-at-top
    candidates = targets.default_names(sweep, _TARGETS.value) if _BACKEND.value != "local" else []
    if candidates and _TARGET.value:
      raise exit_codes.UserError("give --target (one target for every trial) or candidate targets "
                                 "(--targets / the definition's `targets`), not both")
    try:
      spec_lib.parse_targets(candidates)
    except ValueError as e:
      raise exit_codes.UserError(str(e)) from e
    opts = runner.Options(backend=_BACKEND.value, parallel=_PARALLEL.value,
                          retries=sweep.retries, max_restarts=_MAX_RESTARTS.value,
                          ttl_s=_TTL.value, trial_command=_TRIAL_COMMAND.value,
                          target=_TARGET.value, targets=tuple(candidates),
                          launch_flags=tuple(shlex.split(_LAUNCH_FLAGS.value)))
    print(f"sweep {sweep.name}: {len(trials)} trials under {root}", flush=True)
    if _DRY_RUN.value:
      from launch import cost  # pylint: disable=g-import-not-at-top
      from launch.sweep import dryrun  # pylint: disable=g-import-not-at-top
      try:
        prices = cost.load(_PRICES.value) if _PRICES.value else None
      except ValueError as e:
        raise exit_codes.UserError(str(e)) from e
      return dryrun.dry_run(trials, backend=_BACKEND.value, target=_TARGET.value,
                            candidates=candidates, launch_flags=opts.launch_flags, prices=prices,
                            log=lambda s: print(s, flush=True))
    from launch import preflight  # pylint: disable=g-import-not-at-top
    try:  # each distinct data store once, for all trials
      preflight.check_stores(trials, prepare_local=(_BACKEND.value == "local"
                                                    and not _TRIAL_COMMAND.value))
    except ValueError as e:
      raise exit_codes.UserError(str(e)) from e
    return runner.run_sweep(root, trials, opts)
  if command == "status":
    from launch.sweep import report  # pylint: disable=g-import-not-at-top
    print(report.status_table(root, trials, sweep.retries, _TTL.value))
    return exit_codes.OK
  from launch.sweep import report  # pylint: disable=g-import-not-at-top
  for path in report.collect(root, sweep, trials, downstream_tasks=_DOWNSTREAM.value,
                             downstream_limit=_DOWNSTREAM_LIMIT.value):
    print(path)
  return exit_codes.OK


if __name__ == "__main__":
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, __doc__, config_flags_names=(), positional=True)
