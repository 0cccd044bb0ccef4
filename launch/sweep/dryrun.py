"""`run --dry_run`: what a sweep would use and cost, before anything is submitted or written.

Each trial gets its target as `run` would choose it (`--target`, or the first candidate it fits on,
by launch.preflight's cached fit check, whose output streams as it compiles), and its cost from
launch/cost.py: chips x the planner's predicted step time x the trial's steps, times the price of the
target's chip and capacity kind in the user's table. Nothing under the root is written.
"""

from __future__ import annotations

from typing import Callable, Sequence

from launch import cost as cost_lib
from launch import spec as spec_lib
from launch.sweep import definition
from launch.sweep import targets as targets_lib
from recurrentgemma_tpu import exit_codes


def _launch_flag(flags: Sequence[str], name: str, default: str) -> str:
  """The value of `--name=V` among the launch flags every trial gets (the last one wins)."""
  value = default
  for f in flags:
    if f.startswith(f"--{name}="):
      value = f.split("=", 1)[1]
  return value


def dry_run(trials: Sequence[definition.Trial], *, backend: str, target: str,
            candidates: Sequence[str], launch_flags: Sequence[str],
            prices: cost_lib.PriceTable | None, log: Callable[[str], None] = print) -> int:
  """Prints each trial's target, chip-hours and cost, and the totals; returns the exit code
  (NO_FIT when a trial fits none of its targets)."""
  capacity = _launch_flag(launch_flags, "capacity", "on-demand")
  num_slices = int(_launch_flag(launch_flags, "num_slices", "1"))
  if capacity not in spec_lib.CAPACITIES:
    raise exit_codes.UserError(f"--launch_flags: --capacity={capacity!r} must be one of "
                               f"{', '.join(spec_lib.CAPACITIES)}")
  cands = spec_lib.parse_targets([target] if target else list(candidates))
  if backend == "local" or not cands:
    for t in trials:
      log(f"trial {t.id} {t.label}: {t.info['steps']} steps on this machine")
    log("cost: not estimated (no TPU target: run a pod backend with --target or --targets)")
    return exit_codes.OK
  if prices is not None:  # every price the plan may need, before any compile
    for c in cands:
      try:
        prices.price(c.generation, capacity)
      except ValueError as e:
        raise exit_codes.UserError(str(e)) from e
  results = {}

  def check(trial: definition.Trial, t: spec_lib.Target) -> tuple[bool, bool, str]:
    try:
      fit = targets_lib.check_trial(trial, t, log, num_slices)
    except (ValueError, FileNotFoundError) as e:
      return False, False, f"invalid for {t.accelerator_type}: {e}"
    results[(trial.id, t.accelerator_type)] = fit
    return fit.fits, fit.cached, targets_lib.reason(fit.report)

  chip_hours, money, unfit, unknown = 0.0, 0.0, 0, 0
  rows = []
  for trial in trials:
    choice = targets_lib.choose(trial, cands, check)
    label = f"trial {trial.id} {trial.label}".rstrip()
    if not choice["target"]:
      unfit += 1
      rows.append(f"{label}: {choice['error']}")
      continue
    t = next(c for c in cands if c.accelerator_type == choice["target"])
    fit = results[(trial.id, t.accelerator_type)]
    if fit.step_s is None:
      unknown += 1
      rows.append(f"{label}: {t.accelerator_type}, no predicted step time")
      continue
    c = cost_lib.estimate(t, num_slices, capacity, fit.step_s, int(trial.info["steps"]), prices)
    chip_hours += c.chip_hours
    money += c.cost or 0.0
    rows.append(f"{label}: {num_slices} x {t.accelerator_type}, {cost_lib.formula(c)}")
  log(f"# dry run: {len(trials)} trials, {capacity} capacity; nothing is submitted or written")
  for r in rows:
    log(r)
  total = f"total: {cost_lib.hours(chip_hours)} chip-hours"
  if prices is not None:
    total += f", {cost_lib.money(money, prices.currency)} ({prices.describe()})"
  else:
    total += "; pass --prices=FILE for the cost"
  if unfit or unknown:
    total += f" (without {unfit + unknown} trial(s) above that have no estimate)"
  log(total)
  return exit_codes.NO_FIT if unfit else exit_codes.OK
