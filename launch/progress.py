"""What a running job is doing, in one line: step, loss, ETA, restarts, from its first process.

Read from the run directory only (jax-free): process 0's heartbeat (`recurrentgemma_tpu/heartbeat.py`:
step, phase, step time) and the last training record of `metrics.jsonl` (loss). `launch.submit`'s
babysitter prints a line at least every `every_s` seconds while the job compiles or trains; the sweep
runner and `sweep status` use its ETA rule.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from recurrentgemma_tpu import heartbeat
from recurrentgemma_tpu import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """Process 0's last heartbeat and the loss of the newest training record (None when unknown)."""

  step: int
  phase: str  # the heartbeat's phase, "" before the first heartbeat
  step_time: float | None
  loss: float | None
  beat_time: float | None  # when the heartbeat was written (unix seconds)


def read(workdir: str, *, with_loss: bool = True) -> Snapshot:
  """The job's progress now; falls back to metrics.jsonl for the step when there is no heartbeat."""
  beat = heartbeat.read_record(workdir, 0)
  train = []
  if with_loss or beat is None:
    text = workdir_lib.read_text_if_exists(workdir_lib.join(workdir, workdir_lib.METRICS_FILE))
    train = [r for r in workdir_lib.records(text) if r.get("split") == "train"]
  last = train[-1] if train else {}
  loss = last.get("loss")
  if beat is not None:
    # Heartbeats come every few seconds, a metrics record every log_every steps: the newer step wins.
    return Snapshot(max(beat.step, int(last.get("step", 0))), beat.phase, beat.step_time,
                    None if loss is None else float(loss), beat.time)
  return Snapshot(int(last.get("step", 0)), "", last.get("step_time"),
                  None if loss is None else float(loss), None)


def eta_s(step: int, steps: int | None, step_time: float | None) -> float | None:
  """Seconds of training left at the current step time, or None when unknown."""
  if not steps or not step_time:
    return None
  return max(steps - step, 0) * step_time


def _clock(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def line(snap: Snapshot, steps: int | None, restarts: int, now: float) -> str:
  """`progress: step 120/1000 (training), loss 3.412, 0.210 s/step, ETA 3m05s, restarts 1`."""
  parts = [f"step {snap.step}" + (f"/{steps}" if steps else "")
           + (f" ({snap.phase})" if snap.phase else " (no heartbeat yet)")]
  if snap.loss is not None:
    parts.append(f"loss {snap.loss:.4g}")
  if snap.step_time:
    parts.append(f"{snap.step_time:.3g} s/step")
  eta = eta_s(snap.step, steps, snap.step_time)
  if eta is not None:
    parts.append(f"ETA {_clock(eta)}")
  parts.append(f"restarts {restarts}")
  if snap.beat_time is not None:
    parts.append(f"heartbeat {max(now - snap.beat_time, 0):.0f}s ago")
  return "progress: " + ", ".join(parts)


class Reporter:
  """Prints a progress line when `every_s` has passed since the last one (the first poll prints)."""

  def __init__(self, workdir: str, steps: int | None, every_s: float = 30.0,
               log: Callable[[str], None] = print, clock: Callable[[], float] = time.time,
               reader: Callable[[str], Snapshot] = read):
    self.workdir, self.steps, self.every_s, self.log = workdir, steps, every_s, log
    self._clock, self._read = clock, reader
    self._last: float | None = None

  def poll(self, restarts: int) -> str | None:
    """Call at every look at the job; returns the line it printed, if any."""
    now = self._clock()
    if self._last is not None and now - self._last < self.every_s:
      return None
    self._last = now
    text = line(self._read(self.workdir), self.steps, restarts, now)
    self.log(text)
    return text
