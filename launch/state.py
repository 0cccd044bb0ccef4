"""What the launcher records about a run, under <workdir>/launch/ (local disk or gs:// alike, through
the trainer's own file layer, recurrentgemma_tpu/workdir.py):

  <workdir>/launch/spec.json        the JobSpec (a re-submit must match it, and then resumes)
  <workdir>/launch/state.json       phase, attempt, preemption and failure counts, resource, pids,
                                    history
  <workdir>/launch/STOP             written by `launch.stop`: no more restarts
  <workdir>/launch/exit/process_<i>.json   {"rc", "time"} written by each pod host when it exits

The trainer's own files (heartbeat/, logs/, metrics.jsonl) are read through heartbeat.py and
workdir.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from launch import spec as spec_lib
from recurrentgemma_tpu import workdir as workdir_lib

PHASES = ("submitted", "queued", "running", "restarting", "done", "failed", "stopped")
FINAL_PHASES = ("done", "failed", "stopped")


def path(workdir: str, *parts: str) -> str:
  """<workdir>/launch/<parts>."""
  return workdir_lib.join(workdir, workdir_lib.LAUNCH_DIR, *parts)


@dataclasses.dataclass
class RunState:
  """What the launcher knows about a run (state.json); also the supervisor's ledger."""

  phase: str = "submitted"
  attempt: int = 0
  preemptions: int = 0
  failures: int = 0
  resource: str = ""  # queued resource or JobSet of the current attempt
  pids: list[int] = dataclasses.field(default_factory=list)  # local backend
  attempt_started: float = 0.0
  message: str = ""
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  def event(self, what: str, **info: Any) -> None:
    self.history.append({"time": round(time.time(), 3), "event": what, **info})


def load_spec(workdir: str) -> spec_lib.JobSpec:
  text = workdir_lib.read_text_if_exists(path(workdir, "spec.json"))
  if text is None:
    raise FileNotFoundError(f"no launched job in {workdir} ({path(workdir, 'spec.json')} is missing)")
  return spec_lib.JobSpec.from_json(text)


def save_spec(spec: spec_lib.JobSpec) -> None:
  workdir_lib.write_text(path(spec.workdir, "spec.json"), spec.to_json(),
                         tmp_suffix=f".tmp{os.getpid()}")


def load_state(workdir: str) -> RunState:
  text = workdir_lib.read_text_if_exists(path(workdir, workdir_lib.LAUNCH_STATE_FILE))
  return RunState(**json.loads(text)) if text else RunState()


def save_state(workdir: str, state: RunState) -> None:
  workdir_lib.write_text(path(workdir, workdir_lib.LAUNCH_STATE_FILE), json.dumps(dataclasses.asdict(state), indent=1),
                         tmp_suffix=f".tmp{os.getpid()}")


def stop_requested(workdir: str) -> bool:
  return workdir_lib.exists(path(workdir, "STOP"))


def request_stop(workdir: str, reason: str = "launch.stop") -> None:
  workdir_lib.write_text(path(workdir, "STOP"), json.dumps({"time": time.time(), "reason": reason}))


def clear_stop(workdir: str) -> None:
  workdir_lib.remove(path(workdir, "STOP"))


def log_path(workdir: str, process_id: int) -> str:
  return workdir_lib.join(workdir, workdir_lib.LOGS_DIR, f"process_{process_id}.log")


def read_exit(workdir: str, process_id: int) -> dict[str, Any] | None:
  """A pod host's exit record ({"rc", "time"}), written by the startup script."""
  text = workdir_lib.read_text_if_exists(path(workdir, "exit", f"process_{process_id}.json"))
  try:
    return json.loads(text) if text else None
  except ValueError:
    return None
