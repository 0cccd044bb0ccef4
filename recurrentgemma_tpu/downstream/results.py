"""Downstream scores in a workdir: `<workdir>/downstream/step_<N>.json`, plus TensorBoard scalars.

jax- and lm-eval-free: the sweep's `collect` reads the scores through `read_scores`. One file per
evaluated step holds the flat scores (`task/metric` -> number), the settings that produced them and
lm-eval's per-task configs; it is written whole (tmp + rename), so a reader never sees half of it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

from recurrentgemma_tpu import events
from recurrentgemma_tpu import workdir as workdir_lib

DOWNSTREAM_DIR = "downstream"
_STEP_FILE = re.compile(r"step_(\d+)\.json$")


def flatten(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  """lm-eval's `results` section as {'task/metric': value}: numbers only, filter suffix dropped."""
  scores = {}
  for task, metrics in results.items():
    for key, value in metrics.items():
      metric, _, filter_name = key.partition(",")
      if (isinstance(value, (int, float)) and not isinstance(value, bool)
          and metric not in ("sample_len",) and math.isfinite(float(value))):
        name = metric if filter_name in ("", "none") else f"{metric}_{filter_name}"
        scores[f"{task}/{name}"] = float(value)
  return scores


def path_for(workdir: str, step: int) -> str:
  return workdir_lib.join(workdir, DOWNSTREAM_DIR, f"step_{step}.json")


def write(workdir: str, step: int, scores: Mapping[str, float], details: Mapping[str, Any],
          *, tensorboard: bool = True) -> str:
  """Writes `<workdir>/downstream/step_<step>.json` and the scores as `downstream/...` scalars."""
  workdir_lib.makedirs(workdir_lib.join(workdir, DOWNSTREAM_DIR))
  path = path_for(workdir, step)
  record = {"step": int(step), "scores": dict(scores), **details}
  workdir_lib.write_text(path, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
  if tensorboard and scores:
    _write_scalars(workdir, step, scores)
  return path


def _write_scalars(workdir: str, step: int, scores: Mapping[str, float]) -> None:
  # The training writer's kind of events, in their own run directory so that the training writer's
  # event files are never touched.
  writer = events.EventWriter(workdir_lib.join(workdir, workdir_lib.TENSORBOARD_DIR, DOWNSTREAM_DIR))
  writer.scalars(step, {f"downstream/{name}": value for name, value in scores.items()})
  writer.close()


def read_scores(workdir: str) -> dict[int, dict[str, float]]:
  """{step: scores} of every evaluated step in `workdir` (empty if none)."""
  directory = workdir_lib.join(workdir, DOWNSTREAM_DIR)
  if not workdir_lib.isdir(directory):
    return {}
  out = {}
  for name in workdir_lib.listdir(directory):
    m = _STEP_FILE.match(name)
    if m:
      out[int(m.group(1))] = json.loads(workdir_lib.read_text(workdir_lib.join(directory, name)))["scores"]
  return dict(sorted(out.items()))
