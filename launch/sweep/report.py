"""`status` and `collect`: what each trial is doing, and the results table of a sweep.

`collect` writes one row per trial to ROOT/results.csv and ROOT/results.jsonl (base install), and,
with the `sweep` extra (tensorboard), the sweep as a TensorBoard HParams experiment under
ROOT/hparams (one run per finished trial, its hyper-parameters and final metrics). FLOPs are the
project's FLOP model times the trial's tokens (not 6ND). A failed trial's row and status line say
why it failed (e.g. "exit 3 (stopped on a non-finite loss)").
Downstream scores (lm-eval tasks; `config.eval` during training, or `collect --downstream=TASKS`,
which evaluates each finished trial's last checkpoint that lacks them) are the `downstream` column:
`task/metric` -> value at the trial's newest evaluated step.
Goodput: each trial's ledger (recurrentgemma_tpu/goodput.py, read from its workdir) is its row's
`goodput`; `status` prints their sum, `collect` prints it and writes ROOT/goodput.json.
"""

from __future__ import annotations

import csv
import io
import math
import os
import subprocess
import sys
import time
from typing import Any, Sequence


from launch import progress as progress_lib
from launch.sweep import definition
from launch.sweep import state as state_lib
from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import goodput as goodput_lib
from recurrentgemma_tpu import workdir as workdir_lib
from recurrentgemma_tpu.downstream import results as downstream_lib

COLUMNS = ("id", "family", "size", "params", "non_embedding_params", "tokens", "steps", "flops",
           "flops_per_token", "learning_rate", "final_eval_loss", "best_eval_loss", "status", "error",
           "target", "restarts", "wall_time_s", "cpu_time_s", "mfu", "config_hash", "code_version", "variables",
           "downstream_step", "downstream", "goodput")


def code_version() -> str:
  """`git describe` of the checkout the sweep runs from, else the installed package version."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here,
                         capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version("recurrentgemma_tpu")
  except Exception:  # pylint: disable=broad-except
    return "unknown"


def _eta(trial: definition.Trial, step: int, step_time: float | None) -> str:
  seconds = progress_lib.eta_s(step, trial.info["steps"], step_time)
  if seconds is None:
    return "-"
  return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f}d"


def status_table(root: str, trials: Sequence[definition.Trial], retries: int,
                 ttl_s: float = state_lib.DEFAULT_TTL_S) -> str:
  """One line per trial: id, label, state, step/steps, ETA, failures, restarts, holder."""
  lines = [f"{'id':<12} {'trial':<20} {'state':<8} {'step':>11} {'eta':>8} {'fail':>4} "
           f"{'rest':>4}  holder"]
  counts: dict[str, int] = {}
  for t in trials:
    s = state_lib.read_state(root, t.id, retries, ttl_s)
    counts[s.state] = counts.get(s.state, 0) + 1
    step, step_time = state_lib.progress(state_lib.trial_dir(root, t.id))
    if s.state == state_lib.DONE:
      step = t.info["steps"]
    eta = _eta(t, step, step_time) if s.state == state_lib.RUNNING else "-"
    progress = f"{step}/{t.info['steps']}"
    target = _target(root, t.id)
    lines.append(f"{t.id:<12} {t.label:<20} {s.state:<8} {progress:>11} "
                 f"{eta:>8} {s.failures:>4} {s.restarts:>4}  {s.owner if s.live_lease else ''}"
                 f"{'  on ' + target if target else ''}{'  ' + s.reason if s.reason else ''}")
  lines.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
  lines += goodput_total_lines(root, trials)
  return "\n".join(lines)


def goodput_total_lines(root: str, trials: Sequence[definition.Trial]) -> list[str]:
  """The goodput ledgers of the trials, summed (recurrentgemma_tpu/goodput.py), for people."""
  return _goodput_lines(goodput_lib.total(trial_goodput(root, t.id).scalars() for t in trials),
                        len(trials))


def _goodput_lines(total: dict[str, float], trials: int) -> list[str]:
  return [f"sweep goodput over {trials} trials:"] + goodput_lib.format_lines(total)


def trial_goodput(root: str, trial_id: str) -> goodput_lib.Ledger:
  """One trial's goodput ledger, from its workdir (an empty one for a trial that never ran)."""
  return goodput_lib.read(state_lib.trial_dir(root, trial_id))


def _target(root: str, trial_id: str) -> str:
  """The TPU target `run` chose for the trial (pod backends), else ""."""
  choice = workdir_lib.read_json(workdir_lib.join(state_lib.state_dir(root, trial_id), "target.json")) or {}
  return choice.get("target") or ""


def row(root: str, trial: definition.Trial, retries: int, version: str) -> dict[str, Any]:
  """The results row of one trial."""
  s = state_lib.read_state(root, trial.id, retries)
  records = state_lib.read_records(state_lib.trial_dir(root, trial.id))
  evals = [r for r in records if r.get("split") == "eval" and "loss" in r]
  train = [r for r in records if r.get("split") == "train"]
  # The first logged interval includes compilation warm-up; MFU is the mean of the others.
  mfus = [r["mfu"] for r in train[1:] if "mfu" in r and math.isfinite(r["mfu"])]
  downstream = downstream_lib.read_scores(state_lib.trial_dir(root, trial.id))
  last = max(downstream, default=None)
  return {
      "id": trial.id,
      "family": trial.variables.get("family", ""),
      "size": trial.variables.get("size", ""),
      "params": trial.info["params"],
      "non_embedding_params": trial.info["non_embedding_params"],
      "tokens": trial.info["tokens"],
      "steps": trial.info["steps"],
      "flops": trial.info["flops"],
      "flops_per_token": trial.info["flops_per_token"],
      "learning_rate": trial.info["learning_rate"],
      "final_eval_loss": evals[-1]["loss"] if evals else None,
      "best_eval_loss": min(r["loss"] for r in evals) if evals else None,
      "status": s.state,
      "error": s.reason,
      "target": _target(root, trial.id),
      "restarts": s.restarts,
      "wall_time_s": round(s.wall_time, 1),
      "cpu_time_s": round(sum(float(a.get("cpu_s", 0)) for a in s.attempts), 1) or None,
      "mfu": sum(mfus) / len(mfus) if mfus else None,
      "config_hash": trial.config_hash,
      "code_version": version,
      "variables": dict(trial.variables),
      "downstream_step": last,
      "downstream": downstream[last] if last is not None else {},
      "goodput": trial_goodput(root, trial.id).scalars(),
  }


def read_results(root: str) -> list[dict[str, Any]]:
  """The rows `collect` wrote (ROOT/results.jsonl)."""
  import json  # pylint: disable=g-import-not-at-top
  path = workdir_lib.join(root, "results.jsonl")
  text = workdir_lib.read_text_if_exists(path)
  if text is None:
    raise exit_codes.UserError(f"{path} does not exist; run `python -m launch.sweep collect` first")
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def evaluate_downstream(root: str, trials: Sequence[definition.Trial], retries: int, tasks: str,
                        limit: int = 0) -> list[str]:
  """Runs `python -m recurrentgemma_tpu.evaluate --tasks=TASKS` on each finished trial whose newest
  checkpoint has no downstream scores yet; returns the ids of trials it failed on."""
  failed = []
  for t in trials:
    if state_lib.read_state(root, t.id, retries).state != state_lib.DONE:
      continue
    workdir = state_lib.trial_dir(root, t.id)
    if t.info["steps"] in downstream_lib.read_scores(workdir):
      continue
    cmd = [sys.executable, "-m", "recurrentgemma_tpu.evaluate", f"--workdir={workdir}",
           f"--tasks={tasks}", f"--limit={limit}"]
    if subprocess.run(cmd, check=False).returncode != exit_codes.OK:
      failed.append(t.id)
  return failed


def collect(root: str, sweep: definition.Sweep, trials: Sequence[definition.Trial],
            downstream_tasks: str = "", downstream_limit: int = 0, log=print) -> list[str]:
  """Writes results.csv, results.jsonl and (with tensorboard) the HParams log; returns the paths.

  With `downstream_tasks`, finished trials are first evaluated on those lm-eval tasks (once).
  """
  import json  # pylint: disable=g-import-not-at-top
  version = code_version()
  retries = sweep.retries
  if downstream_tasks:
    failed = evaluate_downstream(root, trials, retries, downstream_tasks, downstream_limit)
    if failed:
      print(f"downstream evaluation failed for trials {failed}; their rows have no scores",
            file=sys.stderr)
  rows = [row(root, t, retries, version) for t in trials]
  workdir_lib.makedirs(root)
  totals = workdir_lib.join(root, "goodput.json")
  summed = goodput_lib.total(r["goodput"] for r in rows)
  log("\n".join(_goodput_lines(summed, len(rows))))
  workdir_lib.write_text(totals, json.dumps({"total": summed,
                                             "trials": {r["id"]: r["goodput"] for r in rows}},
                                            indent=1, sort_keys=True) + "\n")
  jsonl = workdir_lib.join(root, "results.jsonl")
  workdir_lib.write_text(jsonl, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=COLUMNS)
  writer.writeheader()
  for r in rows:
    writer.writerow(r | {"variables": json.dumps(r["variables"], sort_keys=True),
                         "downstream": json.dumps(r["downstream"], sort_keys=True),
                         "goodput": json.dumps(r["goodput"], sort_keys=True)})
  csv_path = workdir_lib.join(root, "results.csv")
  workdir_lib.write_text(csv_path, buf.getvalue())
  try:
    import tensorboard  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    log("(no HParams log: it needs the sweep extra, pip install -e '.[sweep]')")
    return [csv_path, jsonl, totals]
  hparams = write_hparams(workdir_lib.join(root, "hparams"), rows, sweep.metric)
  return [csv_path, jsonl, totals, hparams]


def write_hparams(logdir: str, rows: Sequence[dict[str, Any]], metric: str) -> str:
  """The sweep in TensorBoard's HParams dashboard: one run per trial with a final eval loss."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top

  variables = sorted({k for r in rows for k in r["variables"]})
  numeric = ("params", "non_embedding_params", "tokens", "flops", "learning_rate")
  metrics = ("final_eval_loss", "best_eval_loss", "mfu", "wall_time_s")
  with tf.summary.create_file_writer(logdir).as_default():
    hp.hparams_config(
        hparams=[hp.HParam(v) for v in variables] + [hp.HParam(k) for k in numeric],
        metrics=[hp.Metric(m, display_name=(metric if m == "final_eval_loss" else m))
                 for m in metrics])
  for r in rows:
    if r["final_eval_loss"] is None:
      continue
    with tf.summary.create_file_writer(workdir_lib.join(logdir, r["id"])).as_default():
      values = {v: r["variables"].get(v, "") for v in variables}
      values = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in values.items()}
      hp.hparams(values | {k: float(r[k]) for k in numeric}, trial_id=r["id"])
      for m in metrics:
        if r[m] is not None:
          tf.summary.scalar(m, float(r[m]), step=int(r["steps"]))
  return logdir
