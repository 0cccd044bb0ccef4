"""Heartbeat files: how the launcher tells a slow job from a hung one.

Each process writes `<workdir>/heartbeat/process_<i>.json` atomically (temporary file + rename on
a local disk; one object write on gs://, which a bucket makes atomic):

    {"step": int, "time": unix_seconds, "phase": "starting|compiling|training|evaluating|saving|done",
     "step_time": seconds_or_null, "pid": int}

at start, at every phase change, after the first step, and at step boundaries at least every
`TRAINING_INTERVAL_S` while training. A missing or stale file means the process is not making progress.
Each phase entered is also handed to `on_phase` (the trainer's goodput recorder, goodput.py), which
keeps the history that this one overwritten file cannot.

Fault injection for tests: `RECURRENTGEMMA_TPU_PHASE_DELAY="evaluating=3,saving=1"` sleeps that many
seconds right after entering a phase, so a test can kill the process inside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

from recurrentgemma_tpu import workdir as workdir_lib

PHASES = ("starting", "compiling", "training", "evaluating", "saving", "done")
# While training, a boundary writes a beat when the last one is at least this old.
TRAINING_INTERVAL_S = 5.0
_DELAY_ENV = "RECURRENTGEMMA_TPU_PHASE_DELAY"


def path(workdir: str, process_index: int) -> str:
  return workdir_lib.join(workdir, workdir_lib.HEARTBEAT_DIR, f"process_{process_index}.json")


@dataclasses.dataclass(frozen=True)
class Record:
  """One heartbeat, as a reader sees it."""

  step: int
  time: float
  phase: str
  step_time: float | None
  pid: int


def parse(text: str | None) -> Record | None:
  """A heartbeat file's text as a Record; None for no text or a torn or foreign file."""
  if not text:
    return None
  try:
    d = json.loads(text)
    return Record(int(d["step"]), float(d["time"]), str(d["phase"]),
                  None if d.get("step_time") is None else float(d["step_time"]), int(d["pid"]))
  except (ValueError, KeyError, TypeError):
    return None


def read(workdir: str, process_index: int = 0) -> dict | None:
  """The last heartbeat of a process as written (a dict), or None if it has written none."""
  record = read_record(workdir, process_index)
  return dataclasses.asdict(record) if record else None


def read_record(workdir: str, process_index: int = 0) -> Record | None:
  """The last heartbeat of a process, or None if it has written none (or it is unreadable)."""
  try:
    return parse(workdir_lib.read_text(path(workdir, process_index)))
  except FileNotFoundError:
    return None
  except Exception:  # pylint: disable=broad-except
    # A bucket's own not-found and transient errors: no readable beat is the same as none.
    return None


class Heartbeat:
  """Writes this process's heartbeat file (never raises: a full disk must not stop training)."""

  def __init__(self, workdir: str, process_index: int,
               on_phase: Callable[[str, int], None] | None = None):
    """`on_phase(phase, step)` is told of every phase entered (the goodput recorder)."""
    self._path = path(workdir, process_index)
    self._on_phase = on_phase
    self._last = 0.0
    self._dir_made = False
    self.phase = ""  # none yet: the first beat enters its phase (and takes that phase's delay)
    self.step = 0
    self._delays = _parse_delays(os.environ.get(_DELAY_ENV, ""))

  def beat(self, phase: str, step: int | None = None, step_time: float | None = None) -> None:
    """Records `phase` (one of PHASES) at `step` now."""
    assert phase in PHASES, phase
    entering = phase != self.phase
    self.phase = phase
    if step is not None:
      self.step = int(step)
    record = {"step": self.step, "time": time.time(), "phase": phase,
              "step_time": None if step_time is None else float(step_time), "pid": os.getpid()}
    try:
      # Atomic: tmp + rename locally; one object write on a bucket (readers see old or new).
      if not self._dir_made:  # every beat locally (as before); once on a bucket (a write each)
        workdir_lib.makedirs(workdir_lib.parent(self._path))
        self._dir_made = workdir_lib.is_remote(self._path)
      workdir_lib.write_text(self._path, json.dumps(record), tmp_suffix=f".tmp{os.getpid()}")
      self._last = time.monotonic()
    except Exception:  # pylint: disable=broad-except
      pass  # never stop training for a heartbeat (full disk, bucket hiccup)
    if entering and self._on_phase is not None:
      self._on_phase(phase, self.step)
    if entering and self._delays.get(phase):
      time.sleep(self._delays[phase])

  def training(self, step: int, step_time: float | None) -> None:
    """A training step boundary: writes only if the last beat is TRAINING_INTERVAL_S old."""
    if self.phase != "training" or time.monotonic() - self._last >= TRAINING_INTERVAL_S:
      self.beat("training", step, step_time)
    else:
      self.step = step


def _parse_delays(text: str) -> dict[str, float]:
  delays = {}
  for item in filter(None, (t.strip() for t in text.split(","))):
    phase, _, seconds = item.partition("=")
    delays[phase] = float(seconds)
  return delays
