"""The goodput ledger: where a run's wall-clock time went, from submission to completion.

Built from the run directory alone, the same way on every backend (no cloud logging):
  * the launcher's events (`<workdir>/launch/state.json`: submitted, attempt started/ended);
  * process 0's timing records, `<workdir>/goodput.jsonl`, which `Recorder` appends (one JSON
    object a line, flushed at once on a local disk, so a SIGKILL loses at most a torn last line):

      {"t": unix_s, "kind": "start", "process_start": unix_s, "pid": int}   a trainer process began
      {"t": unix_s, "kind": "phase", "phase": P, "step": int, "data_s": s}  entered heartbeat phase P
      {"t": unix_s, "kind": "step", "step": int, "data_s": s}              a train record was logged
      {"t": unix_s, "kind": "rollback", "step": int, "restored_step": int}  a loss-spike rollback
      {"t": unix_s, "kind": "exit", "data_s": s}                           the trainer returned

    `data_s` is the time spent fetching batches since the previous record.
  * `metrics.jsonl`'s "rollback" records (count and steps rolled back).

`compute` walks these marks in time order and gives every second of [start, end] to exactly one
category, so the categories always sum to the wall-clock time. Work lost is training whose result
a restart or a rollback threw away: when training resumes at step c, the time already spent on
steps after c (and the unrecorded tail of a killed process) is moved from productive to work lost,
and those steps count as redone. This module has no jax dependency: the launcher reads it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from absl import logging

from recurrentgemma_tpu import workdir as workdir_lib

CATEGORIES = ("productive", "queued", "startup", "compile", "data_wait", "checkpoint",
              "evaluation", "work_lost", "other")
LABELS = {"productive": "productive steps", "queued": "queued", "startup": "start-up",
          "compile": "compile", "data_wait": "waiting for data", "checkpoint": "checkpoint saves",
          "evaluation": "evaluations", "work_lost": "work lost", "other": "other"}
# The trainer's heartbeat phases (heartbeat.PHASES) and where their time goes.
PHASE_CATEGORY = {"starting": "startup", "compiling": "compile", "training": "productive",
                  "evaluating": "evaluation", "saving": "checkpoint", "done": "other"}
# Launcher events (launch/state.py's history) that begin queueing, begin an attempt, or end one.
QUEUE_EVENTS = ("submitted", "created")
ATTEMPT_START_EVENTS = ("started", "active", "applied", "restarted")
ATTEMPT_END_EVENTS = ("done", "preempted", "failed", "fatal", "stopped")
# On a bucket each flush rewrites the object: step records are flushed at most this often there.
REMOTE_FLUSH_S = 60.0


def path(workdir: str) -> str:
  return workdir_lib.join(workdir, workdir_lib.GOODPUT_FILE)


def process_start_time(now: float) -> float | None:
  """When this process started (unix seconds), or None where that is unknown.

  From /proc: the process's start in clock ticks since boot against the uptime now (both to 10 ms;
  /proc/stat's boot time is rounded to whole seconds, too coarse to order it against the launcher).
  """
  try:
    with open("/proc/self/stat") as f:
      ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return now - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
  except (OSError, ValueError, IndexError):
    return None


# ------------------------------------------------------------------------------------ recording


class Recorder:
  """Appends process 0's timing records to `<workdir>/goodput.jsonl` (a no-op on other processes).

  The heartbeat reports phase changes (`phase`), the metrics writer every record it writes
  (`on_metrics`), and the loop wraps each batch fetch in `data_wait()`. Never raises on a write:
  a full disk must not stop training.
  """

  def __init__(self, workdir: str, *, enabled: bool, clock: Callable[[], float] = time.time):
    self.enabled, self._clock = enabled, clock
    self._workdir, self._path = workdir, path(workdir)
    self._file = None
    self._data_s = 0.0
    self._last_flush = 0.0
    if enabled:
      now = clock()
      start = process_start_time(now)
      self._write({"kind": "start", "process_start": min(start, now) if start else now,
                   "pid": os.getpid()}, flush=True, now=now)

  def phase(self, phase: str, step: int) -> None:
    """The heartbeat entered `phase` at `step`."""
    self._write({"kind": "phase", "phase": phase, "step": int(step), **self._take_data()}, flush=True)

  def on_metrics(self, step: int, prefix: str, scalars: Mapping[str, float]) -> None:
    """The metrics writer wrote a record: train records mark progress, rollback records a restart."""
    if prefix == "train":
      self._write({"kind": "step", "step": int(step), **self._take_data()})
    elif prefix == "rollback" and "restored_step" in scalars:
      self._write({"kind": "rollback", "step": int(step),
                   "restored_step": int(scalars["restored_step"])}, flush=True)

  @contextlib.contextmanager
  def data_wait(self) -> Iterator[None]:
    """Time inside counts as waiting for data."""
    t = time.perf_counter()
    try:
      yield
    finally:
      self._data_s += time.perf_counter() - t

  def exit(self) -> None:
    """The trainer is returning (completed, preempted or stopped on an error)."""
    self._write({"kind": "exit", **self._take_data()}, flush=True)
    if self._file is not None:
      try:
        self._file.close()
      except Exception:  # pylint: disable=broad-except
        pass
      self._file = None

  def summarize(self, step: int,
                write: Callable[[int, Mapping[str, float]], None] | None = None) -> Ledger | None:
    """Writes the exit record, logs the run's ledger up to now, and hands its scalars to `write`
    (the metrics writer: TensorBoard scalars `goodput/...` at `step`); None on other processes."""
    self.exit()
    if not self.enabled:
      return None
    try:
      ledger = read(self._workdir, end=self._clock())
    except Exception as e:  # pylint: disable=broad-except
      # A bucket's transient error: the ledger can be read later (launch.status --goodput).
      logging.warning("Goodput ledger not computed (%s: %s).", type(e).__name__, e)
      return None
    logging.info("Goodput ledger (python -m launch.status --goodput shows it for a launched run):\n%s",
                 "\n".join(ledger.lines()))
    if write is not None:
      write(step, ledger.scalars())
    return ledger

  def _take_data(self) -> dict[str, float]:
    data, self._data_s = self._data_s, 0.0
    return {"data_s": round(data, 6)} if data else {}

  def _write(self, record: dict[str, Any], flush: bool = False, now: float | None = None) -> None:
    if not self.enabled:
      return
    now = self._clock() if now is None else now
    try:
      if self._file is None:
        workdir_lib.makedirs(workdir_lib.parent(self._path))
        self._file = workdir_lib.open_append(self._path)
      self._file.write(json.dumps({"t": round(now, 6), **record}) + "\n")
      # Line-buffered locally (every record is on disk at once); a bucket's object is rewritten
      # on each flush, so there step records are flushed at most every REMOTE_FLUSH_S.
      if flush or now - self._last_flush >= REMOTE_FLUSH_S:
        self._file.flush()
        self._last_flush = now
    except Exception:  # pylint: disable=broad-except
      pass


# ------------------------------------------------------------------------------------ the ledger


@dataclasses.dataclass(frozen=True)
class Ledger:
  """Where the wall-clock time of [start, end] went (seconds per CATEGORIES entry)."""

  start: float
  end: float
  seconds: dict[str, float]
  productive_steps: int  # steps whose training was kept
  work_lost_steps: int  # steps trained again after a restart or a rollback threw them away
  attempts: int
  rollbacks: int
  rollback_steps: int  # sum of (step - restored_step) over the rollback records

  @property
  def wall_clock_s(self) -> float:
    return self.end - self.start

  @property
  def goodput(self) -> float:
    """The productive share of the wall-clock time (0 for an empty window)."""
    return self.seconds["productive"] / self.wall_clock_s if self.wall_clock_s > 0 else 0.0

  def scalars(self) -> dict[str, float]:
    """TensorBoard scalars / JSON fields: `<category>_s` and the counts."""
    return {**{f"{c}_s": self.seconds[c] for c in CATEGORIES}, "wall_clock_s": self.wall_clock_s,
            "goodput": self.goodput, "productive_steps": self.productive_steps,
            "work_lost_steps": self.work_lost_steps, "attempts": self.attempts,
            "rollbacks": self.rollbacks, "rollback_steps": self.rollback_steps}

  def lines(self) -> list[str]:
    """The ledger for people: a header, one line per category, the counts."""
    return format_lines(self.scalars(), self.start, self.end)


def format_lines(scalars: Mapping[str, float], start: float | None = None,
                 end: float | None = None) -> list[str]:
  """`Ledger.lines` of a ledger's scalars (also of a sum of several: `total`)."""
  wall = scalars["wall_clock_s"]
  when = ""
  if start is not None and end is not None:
    fmt = "%Y-%m-%d %H:%M:%S"
    when = f" ({time.strftime(fmt, time.gmtime(start))} to {time.strftime(fmt, time.gmtime(end))} UTC)"
  out = [f"goodput {100 * scalars['goodput']:.1f}% of {_duration(wall)} wall-clock{when}"]
  notes = {"productive": f"{int(scalars['productive_steps'])} steps",
           "work_lost": f"{int(scalars['work_lost_steps'])} steps redone"}
  for c in CATEGORIES:
    s = scalars[f"{c}_s"]
    share = 100 * s / wall if wall > 0 else 0.0
    out.append(f"  {LABELS[c]:<17} {s:>10.1f}s {share:>5.1f}%" + (f"  ({notes[c]})" if c in notes else ""))
  out.append(f"  attempts {int(scalars['attempts'])}, rollbacks {int(scalars['rollbacks'])} "
             f"({int(scalars['rollback_steps'])} steps rolled back)")
  return out


def total(scalars: Iterable[Mapping[str, float]]) -> dict[str, float]:
  """The sum of several runs' `Ledger.scalars()` (a sweep); goodput is then the summed productive
  time over the summed wall-clock time."""
  out = dict.fromkeys(Ledger(0.0, 0.0, dict.fromkeys(CATEGORIES, 0.0), 0, 0, 0, 0, 0).scalars(), 0.0)
  for one in scalars:
    for k in out:
      out[k] += one[k]
  out["goodput"] = out["productive_s"] / out["wall_clock_s"] if out["wall_clock_s"] > 0 else 0.0
  return out


@dataclasses.dataclass
class _Chunk:
  """Kept training time between two marks, over steps (lo, hi]."""

  productive: float
  data: float
  lo: int
  hi: int


def _marks(records: Sequence[Mapping[str, Any]],
           events: Sequence[Mapping[str, Any]]) -> list[tuple[float, int, str, Mapping[str, Any]]]:
  marks = []
  for i, e in enumerate(events):
    what = e.get("event")
    kind = ("queue" if what in QUEUE_EVENTS else "attempt" if what in ATTEMPT_START_EVENTS
            else "attempt_end" if what in ATTEMPT_END_EVENTS else None)
    if kind:
      marks.append((float(e["time"]), i, kind, e))
  launcher_times = sorted(m[0] for m in marks)
  previous = float("-inf")  # the time of the record before, in file order
  for i, r in enumerate(records, start=len(events)):
    kind = r.get("kind")
    if kind == "start":
      # A process start before the record written before it is a second run inside one process
      # (a notebook, a test): that run starts with its record. Never before the launcher's last
      # event that precedes the record: two clocks, and the process start's precision, must not
      # reorder a process start and its attempt's start.
      start = float(r.get("process_start", r["t"]))
      if start < previous:
        start = float(r["t"])
      before = [x for x in launcher_times if x <= float(r["t"])]
      marks.append((max([start] + before[-1:]), i, kind, r))
    elif kind in ("phase", "step", "rollback", "exit"):
      marks.append((float(r["t"]), i, kind, r))
    previous = max(previous, float(r["t"]))
  return sorted(marks, key=lambda m: (m[0], m[1]))


def compute(records: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]] = (),
            metrics: Sequence[Mapping[str, Any]] = (), *, end: float | None = None) -> Ledger:
  """The ledger of one run.

  Args:
    records: goodput.jsonl's records, in file order.
    events: the launcher's history (dicts with "time" and "event"), empty for a run started by hand.
    metrics: metrics.jsonl's records (only the "rollback" split is read).
    end: the end of the window (now, for a live run); None: the last record or event.

  Returns:
    A Ledger whose seconds sum to end - start, start being the first event or process start.
  """
  marks = _marks(records, events)
  rollback_records = [m for m in metrics if m.get("split") == "rollback"]
  rollback_steps = sum(max(0, int(m["step"]) - int(m["restored_step"])) for m in rollback_records)
  if not marks:
    now = end if end is not None else 0.0
    return Ledger(now, now, dict.fromkeys(CATEGORIES, 0.0), 0, 0, 0, len(rollback_records),
                  rollback_steps)
  start = marks[0][0]
  end = max(start, marks[-1][0] if end is None else end)
  seconds = dict.fromkeys(CATEGORIES, 0.0)
  chunks: list[_Chunk] = []
  category: str | None = None
  known: int | None = None  # the last logged step of the current stretch of training
  lost_steps = 0
  launched = any(m[2] == "attempt" for m in marks)
  attempts = 0
  prev = start

  def begin_stretch(c: int) -> None:
    """Training (re)starts after step c: kept work on later steps is thrown away."""
    nonlocal known, lost_steps
    if known is not None:
      lost_steps += max(0, known - c)
    for ch in chunks:
      if ch.hi <= c:
        continue
      # The share of the chunk's steps after c (all of it for a chunk of no logged step).
      f = (ch.hi - c) / (ch.hi - ch.lo) if ch.lo < c else 1.0
      seconds["work_lost"] += f * (ch.productive + ch.data)
      ch.productive, ch.data = (1 - f) * ch.productive, (1 - f) * ch.data
      ch.lo, ch.hi = min(ch.lo, c), c
    known = c

  for t, _, kind, payload in marks + [(end, len(marks), "end", {})]:
    t = min(max(t, start), end)
    span, prev = t - prev, t
    data = min(float(payload.get("data_s", 0.0)), span)
    if category == "productive":
      if kind == "attempt_end":
        seconds["work_lost"] += span  # a killed process trained on unrecorded, then was lost
      elif kind == "start" and not launched:
        seconds["other"] += span  # a run restarted by hand: when the last process died is unknown
      else:
        lo = known if known is not None else 0
        hi = int(payload["step"]) if kind == "step" else lo
        chunks.append(_Chunk(span - data, data, lo, max(lo, hi)))
    elif category == "compile":
      seconds["compile"] += span - data
      seconds["data_wait"] += data
    elif category == "queued" and kind == "queue" and payload.get("event") == "submitted":
      seconds["other"] += span  # between an attempt's end and a re-submission: nothing was asked
    elif category is not None:
      seconds[category] += span
    if kind == "queue" or kind == "attempt_end":
      category = "queued"
    elif kind == "attempt":
      category, attempts = "startup", attempts + 1
    elif kind == "start":
      category = "startup"
      attempts += 0 if launched else 1
    elif kind == "phase":
      category = PHASE_CATEGORY[payload["phase"]]
      if payload["phase"] == "compiling":
        begin_stretch(int(payload["step"]))
    elif kind == "step":
      known = int(payload["step"])
    elif kind == "rollback":
      begin_stretch(int(payload["restored_step"]))
    elif kind == "exit":
      category = "other"
  seconds["productive"] += sum(ch.productive for ch in chunks)
  seconds["data_wait"] += sum(ch.data for ch in chunks)
  # Training restarts only from a step it had kept, so the kept steps are 1..(the last logged one).
  return Ledger(start, end, seconds, known or 0, lost_steps, attempts, len(rollback_records),
                rollback_steps)


# ------------------------------------------------------------------------------------ reading


def read_records(workdir: str) -> list[dict[str, Any]]:
  """goodput.jsonl's records (a torn last line is dropped)."""
  return workdir_lib.records(workdir_lib.read_text_if_exists(path(workdir)))


def launcher_history(workdir: str) -> tuple[list[dict[str, Any]], str]:
  """The launcher's events and phase from `<workdir>/launch/state.json` (([], "") without one)."""
  text = workdir_lib.read_text_if_exists(
      workdir_lib.join(workdir, workdir_lib.LAUNCH_DIR, workdir_lib.LAUNCH_STATE_FILE))
  try:
    state = json.loads(text) if text else {}
  except ValueError:
    return [], ""
  return list(state.get("history", [])), str(state.get("phase", ""))


def read(workdir: str, *, end: float | None = None, live: bool | None = None) -> Ledger:
  """The ledger of the run in `workdir`, from its own files.

  Args:
    workdir: the run directory.
    end: the window's end; None: now while the run is live, else its last event or record.
    live: whether the run still goes on; None: judged from the launcher's phase (a run without a
      launcher counts as finished once its trainer wrote an exit record).
  """
  records = read_records(workdir)
  events, phase = launcher_history(workdir)
  if live is None:
    if phase:
      live = phase not in ("done", "failed", "stopped")
    else:
      live = not records or records[-1].get("kind") != "exit"
  if end is None and live:
    end = time.time()
  metrics = workdir_lib.records(workdir_lib.read_text_if_exists(
      workdir_lib.join(workdir, workdir_lib.METRICS_FILE)))
  return compute(records, events, metrics, end=end)


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"
