"""Per-trial TPU targets for pod backends: the smallest candidate slice each trial fits on.

The candidates come from the definition (`targets = ("v5p-8", "v5p-16", ...)`) or `--targets`.
They are tried in order of generation (as first named) and, within a generation, by ascending chip
count; the first one on which `launch.preflight`'s ahead-of-time compile says the trial fits is the
trial's target. Verdicts are cached by (experiment fingerprint, topology, slices), so a rerun, a
second driver on the same host or a sweep that repeats a config compiles nothing again. The choice
is written to ROOT/state/ID/target.json; `run` passes it to `launch.submit --target`, `collect`
reports it. A trial that fits no candidate is never submitted: target.json says why, and the trial
is failed.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from launch import spec as spec_lib
from launch.sweep import definition
from launch.sweep import state as state_lib
from recurrentgemma_tpu import workdir as workdir_lib

TARGET_FILE = "target.json"

# (trial, target) -> (fits, cached, one-line reason)
Check = Callable[[definition.Trial, spec_lib.Target], tuple[bool, bool, str]]


def reason(report: str) -> str:
  """The line of a compile report that says why (not) it fits."""
  lines = [l.strip() for l in report.splitlines() if l.strip()]
  for key in ("RESOURCE_EXHAUSTED", "error:", "total "):
    for line in reversed(lines):
      if key in line:
        return line[-300:]
  return lines[-1][-300:] if lines else ""


def check_trial(trial: definition.Trial, target: spec_lib.Target, log: Callable[[str], None] = print,
                num_slices: int = 1) -> Any:
  """launch.preflight's cached AOT fit check (a FitCheck, with the predicted step time) of one trial
  on `num_slices` slices of one target; ValueError / FileNotFoundError when invalid for it."""
  from launch import preflight  # pylint: disable=g-import-not-at-top
  # Only config, overrides and target matter to the preflight; "local" skips the cloud fields.
  spec = spec_lib.JobSpec(config=trial.spec, overrides=tuple(trial.overrides), workdir="plan",
                          backend="local", target=target, num_slices=num_slices)
  return preflight.fit_check(spec, preflight.fingerprint(spec), log=log)


def fit_check(trial: definition.Trial, target: spec_lib.Target,
              log: Callable[[str], None] = print) -> tuple[bool, bool, str]:
  """launch.preflight's cached AOT fit check of one trial on one target (one slice)."""
  try:
    result = check_trial(trial, target, log)
  except (ValueError, FileNotFoundError) as e:
    return False, False, f"invalid for {target.accelerator_type}: {e}"
  return result.fits, result.cached, reason(result.report)


def choose(trial: definition.Trial, cands: Sequence[spec_lib.Target],
           check: Check) -> dict[str, Any]:
  """The first candidate the trial fits on; {"target", "topology", "candidates", "tried", "error"}."""
  tried = []
  for t in cands:
    fits, cached, reason = check(trial, t)
    tried.append({"target": t.accelerator_type, "topology": t.topology_name, "fits": fits,
                  "cached": cached, "reason": reason})
    if fits:
      return {"target": t.accelerator_type, "topology": t.topology_name,
              "candidates": [c.accelerator_type for c in cands], "tried": tried, "error": ""}
  label = f" ({trial.label})" if trial.label else ""
  error = (f"trial {trial.id}{label} fits none of the candidate targets " +
           "; ".join(f"{x['target']}: {x['reason']}" for x in tried))
  return {"target": None, "topology": None, "candidates": [c.accelerator_type for c in cands],
          "tried": tried, "error": error}


def read(root: str, trial_id: str) -> dict[str, Any] | None:
  return workdir_lib.read_json(workdir_lib.join(state_lib.state_dir(root, trial_id), TARGET_FILE))


def plan(root: str, trials: Sequence[definition.Trial], names: Sequence[str],
         check: Check | None = None, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
  """Chooses (or re-reads) every trial's target before anything is submitted; trial id -> choice."""
  cands = spec_lib.parse_targets(names)
  if not cands:
    raise ValueError("no candidate targets: set `targets` in the definition or pass --targets")
  check = check or (lambda trial, target: fit_check(trial, target, log=log))
  names_in_order = [c.accelerator_type for c in cands]
  out = {}
  for trial in trials:
    previous = read(root, trial.id)
    if previous is not None and previous.get("candidates") == names_in_order:
      out[trial.id] = previous
      continue
    choice = choose(trial, cands, check)
    workdir_lib.write_json(workdir_lib.join(state_lib.state_dir(root, trial.id), TARGET_FILE), choice)
    out[trial.id] = choice
    if choice["target"]:
      log(f"target {trial.id} {trial.label}: {choice['target']} ({choice['topology']})")
    else:
      log(f"error: {choice['error']}")
  return out


def default_names(sweep: Any, flag_value: str) -> list[str]:
  """--targets (comma-separated) if given, else the definition's `targets`, else []."""
  if flag_value:
    return [n.strip() for n in flag_value.split(",") if n.strip()]
  return list(sweep.targets)

