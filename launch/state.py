"""Files of a run, on local disk or gs:// alike (etils.epath):

  <workdir>/launch/spec.json        the JobSpec (a re-submit must match it, and then resumes)
  <workdir>/launch/state.json       phase, attempt, retry counts, current resource, pids, history
  <workdir>/launch/STOP             written by `launch.stop`: no more restarts
  <workdir>/launch/exit/process_<i>.json   {"rc", "time"} written by each pod host when it exits
  <workdir>/heartbeat/process_<i>.json     written by the trainer (step, time, phase, step_time, pid)
  <workdir>/logs/process_<i>.log           each host's stdout and stderr
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

PHASES = ("submitted", "queued", "running", "restarting", "done", "failed", "stopped")
FINAL_PHASES = ("done", "failed", "stopped")


def _path(p: str):
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(p)


def join(workdir: str, *parts: str) -> str:
  return "/".join([workdir.rstrip("/"), *parts])


def read_text(path: str) -> str | None:
  p = _path(path)
  try:
    return p.read_text()
  except FileNotFoundError:
    return None
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ == "NotFoundError":  # tf.io.gfile's, for gs://
      return None
    raise


def write_text(path: str, text: str) -> None:
  """Writes atomically where the filesystem allows (tmp + rename locally; GCS objects are atomic)."""
  p = _path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  if path.startswith("gs://"):
    p.write_text(text)
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def exists(path: str) -> bool:
  return _path(path).exists()


def remove(path: str) -> None:
  p = _path(path)
  if p.exists():
    p.unlink()


@dataclasses.dataclass
class RunState:
  """What the launcher knows about a run (state.json)."""

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


def spec_path(workdir: str) -> str:
  return join(workdir, "launch", "spec.json")


def load_spec(workdir: str):
  from launch import spec as spec_lib  # pylint: disable=g-import-not-at-top
  text = read_text(spec_path(workdir))
  if text is None:
    raise FileNotFoundError(f"no launched job in {workdir} ({spec_path(workdir)} is missing)")
  return spec_lib.JobSpec.from_json(text)


def save_spec(spec) -> None:
  write_text(spec_path(spec.workdir), spec.to_json())


def load_state(workdir: str) -> RunState:
  text = read_text(join(workdir, "launch", "state.json"))
  return RunState(**json.loads(text)) if text else RunState()


def save_state(workdir: str, state: RunState) -> None:
  write_text(join(workdir, "launch", "state.json"), json.dumps(dataclasses.asdict(state), indent=1))


def stop_requested(workdir: str) -> bool:
  return exists(join(workdir, "launch", "STOP"))


def request_stop(workdir: str, reason: str = "launch.stop") -> None:
  write_text(join(workdir, "launch", "STOP"), json.dumps({"time": time.time(), "reason": reason}))


def clear_stop(workdir: str) -> None:
  remove(join(workdir, "launch", "STOP"))


def log_path(workdir: str, process_id: int) -> str:
  return join(workdir, "logs", f"process_{process_id}.log")


# ------------------------------------------------------------------------------------ heartbeats


@dataclasses.dataclass(frozen=True)
class Heartbeat:
  step: int
  time: float
  phase: str
  step_time: float | None
  pid: int


def read_heartbeat(workdir: str, process_id: int) -> Heartbeat | None:
  """The trainer's heartbeat of one process, or None if there is none (yet) or it is unreadable."""
  text = read_text(join(workdir, "heartbeat", f"process_{process_id}.json"))
  if not text:
    return None
  try:
    d = json.loads(text)
    return Heartbeat(int(d["step"]), float(d["time"]), str(d["phase"]),
                     None if d.get("step_time") is None else float(d["step_time"]), int(d["pid"]))
  except (ValueError, KeyError, TypeError):
    return None  # a torn or foreign file counts as no heartbeat


def read_exit(workdir: str, process_id: int) -> dict[str, Any] | None:
  """A pod host's exit record ({"rc", "time"}), written by the startup script."""
  text = read_text(join(workdir, "launch", "exit", f"process_{process_id}.json"))
  try:
    return json.loads(text) if text else None
  except ValueError:
    return None


def hang_verdict(hb: Heartbeat | None, *, now: float, started: float, startup_timeout_s: float,
                 hang_factor: float, min_hang_s: float, pid: int | None = None) -> str | None:
  """Why a process counts as hung, or None while it looks alive.

  No heartbeat yet (or only one from an earlier attempt) means "starting": allowed until
  `startup_timeout_s` after the attempt started. While starting or compiling, the same deadline holds.
  Once training, no new heartbeat for max(min_hang_s, hang_factor x step_time) means hung; while
  evaluating or saving (no step boundaries inside), at least `startup_timeout_s`.
  """
  fresh = hb is not None and hb.time >= started - 1 and (pid is None or hb.pid == pid)
  if not fresh or hb.phase in ("starting", "compiling"):
    if startup_timeout_s and now - started > startup_timeout_s:
      what = "no heartbeat" if not fresh else f"still {hb.phase}"
      return f"{what} {now - started:.0f}s after start (startup timeout {startup_timeout_s:.0f}s)"
    return None
  if hb.phase == "done":
    return None
  limit = max(min_hang_s, hang_factor * (hb.step_time or 0.0))
  if hb.phase in ("evaluating", "saving"):
    # One long operation with no step boundary inside: allowed as long as a start-up.
    limit = max(limit, startup_timeout_s)
  if now - hb.time > limit:
    return (f"no heartbeat for {now - hb.time:.0f}s at step {hb.step} (phase {hb.phase}; limit "
            f"{limit:.0f}s = max({min_hang_s:.0f}, {hang_factor:g} x step time {hb.step_time}))")
  return None
