"""`plot`: the sweep's figures as PNGs under ROOT/plots (the only module that imports matplotlib).

  loss_vs_flops.png   eval loss against training FLOPs per family, log-log, with the L(C) fits and
                      their 95% bootstrap bands (the Griffin paper's Figure 1a)
  training_curves.png train loss against tokens for every trial
  isoflop.png         eval loss against parameters for each isoFLOP budget (when the sweep has any)
Each figure has a CSV of the numbers drawn beside it.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Sequence

import numpy as np

from launch.sweep import fit as fit_lib
from launch.sweep import report
from launch.sweep import state as state_lib
from recurrentgemma_tpu import gcs

COLORS = {"mqa": "tab:blue", "hawk": "tab:orange", "griffin": "tab:green"}


def _pyplot():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError("plot needs matplotlib: pip install -e '.[sweep]'") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def loss_vs_flops(rows: Sequence[dict[str, Any]], fits: dict[str, Any], out_dir: str,
                  title: str) -> str:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
  csv_rows = []
  for fam, entry in fits.items():
    color = COLORS.get(fam)
    c = np.array(entry["flops"])
    loss = np.array(entry["loss"])
    ax.scatter(c, loss, color=color, zorder=3, s=22)
    grid = np.geomspace(c.min() / 1.5, c.max() * 1.5, 100)
    x = np.log(grid)
    form = fit_lib.preferred_form(entry)
    e = entry.get(form)
    if e is not None:
      pred = fit_lib.predict(e["_fit"], x)
      alpha = e["params"]["alpha"]
      ci = e["interval_95"].get("alpha", (math.nan, math.nan))
      ax.plot(grid, pred, color=color,
              label=f"{fam}: alpha={alpha:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] ({form})")
      if e["_boots"]:
        lo, hi = fit_lib.prediction_interval(e["_boots"], x)
        ax.fill_between(grid, lo, hi, color=color, alpha=0.15, linewidth=0)
    for ci_, li in zip(c, loss):
      csv_rows.append((fam, ci_, li))
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("training FLOPs (project FLOP model)")
  ax.set_ylabel("held-out loss (nats/token)")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(out_dir, "loss_vs_flops.png")
  fig.savefig(path)
  plt.close(fig)
  _write_csv(path[:-4] + ".csv", ("family", "flops", "eval_loss"), csv_rows)
  return path


def training_curves(root: str, rows: Sequence[dict[str, Any]], out_dir: str) -> str:
  plt = _pyplot()
  fams = sorted({r["family"] for r in rows})
  fig, axes = plt.subplots(1, max(len(fams), 1), figsize=(4 * max(len(fams), 1), 3.6), dpi=100,
                           sharey=True, squeeze=False)
  csv_rows = []
  for ax, fam in zip(axes[0], fams):
    for r in sorted((r for r in rows if r["family"] == fam), key=lambda r: r["params"]):
      records = state_lib.read_records(state_lib.trial_dir(root, r["id"]))
      train = [x for x in records if x.get("split") == "train" and "loss" in x]
      if not train:
        continue
      tokens_per_step = r["tokens"] / r["steps"]
      steps = np.array([x["step"] for x in train])
      loss = np.array([x["loss"] for x in train])
      ax.plot(steps * tokens_per_step, loss, label=f"{r['size']} ({r['params'] / 1e6:.2g}M)")
      csv_rows += [(r["id"], fam, r["size"], s, s * tokens_per_step, l) for s, l in zip(steps, loss)]
    ax.set_xscale("log")
    ax.set_title(fam)
    ax.set_xlabel("tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel("train loss")
  fig.tight_layout()
  path = os.path.join(out_dir, "training_curves.png")
  fig.savefig(path)
  plt.close(fig)
  _write_csv(path[:-4] + ".csv", ("id", "family", "size", "step", "tokens", "train_loss"), csv_rows)
  return path


def isoflop(rows: Sequence[dict[str, Any]], fits: dict[str, Any], out_dir: str) -> str | None:
  budgeted = [r for r in rows if r["variables"].get("budget")]
  if not budgeted:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
  csv_rows = []
  for fam in sorted({r["family"] for r in budgeted}):
    for b in sorted({r["variables"]["budget"] for r in budgeted}):
      pts = sorted((r for r in budgeted if r["family"] == fam and r["variables"]["budget"] == b
                    and r["final_eval_loss"] is not None), key=lambda r: r["params"])
      if not pts:
        continue
      n = [r["params"] for r in pts]
      loss = [r["final_eval_loss"] for r in pts]
      ax.plot(n, loss, "o-", color=COLORS.get(fam), alpha=0.8, label=f"{fam} C={b:.2g}")
      csv_rows += [(fam, b, ni, li) for ni, li in zip(n, loss)]
    for o in fits.get(fam, {}).get("isoflop", []):
      if math.isfinite(o["n_opt"]):
        ax.scatter([o["n_opt"]], [o["loss_opt"]], marker="*", s=90, color=COLORS.get(fam), zorder=4)
  ax.set_xscale("log")
  ax.set_xlabel("parameters")
  ax.set_ylabel("held-out loss")
  ax.set_title("isoFLOP profiles (stars: fitted optimum N*)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=6)
  fig.tight_layout()
  path = os.path.join(out_dir, "isoflop.png")
  fig.savefig(path)
  plt.close(fig)
  _write_csv(path[:-4] + ".csv", ("family", "budget", "params", "eval_loss"), csv_rows)
  return path


def plot_all(root: str, sweep: Any, *, n_bootstrap: int = 200) -> list[str]:
  """Every figure of a collected sweep; returns the paths written."""
  if gcs.is_gcs(root):
    raise ValueError("plot writes local files: copy the root locally first (gsutil -m cp -r)")
  rows = report.read_results(root)
  fits = fit_lib.fit_sweep(rows, n_bootstrap=n_bootstrap)
  out_dir = os.path.join(root, "plots")
  os.makedirs(out_dir, exist_ok=True)
  done = [r for r in rows if r["status"] == "done"]
  paths = [loss_vs_flops(done, fits, out_dir, f"{sweep.name}: loss vs training compute"),
           training_curves(root, done, out_dir)]
  iso = isoflop(done, fits, out_dir)
  if iso:
    paths.append(iso)
  return paths
