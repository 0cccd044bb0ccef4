"""Loss-spike recovery: the rule that finds a spike, the rollback budget, and the record of skipped data.

The training loop (trainer.py) reads each step's loss and gradient norm back anyway (MAX_IN_FLIGHT
steps behind); with `config.spikes.enabled` it hands them to `Recovery.observe`, which applies the
rule (`Detector`): a NaN/Inf loss or gradient norm is a spike at once; a loss above `factor` times
the median of the previous `window` losses for `consecutive` steps in a row is one too. On a spike
the loop rolls back to the newest checkpoint whose parameters were measured good, and skips the
data of every step trained since that checkpoint:

    logged step b (first bad)   loss of the batch of training step b-1, on parameters after b-1 updates
    restored step r             newest checkpoint with r <= b-2 (its parameters gave the good loss
                                of logged step r+1 <= b-1)
    skipped data steps          data_step(r) .. data_step(D-1), D the step the rule fired at

From then on training step s >= r reads data step s + offset (`data_step`): the batch of a data step
is a function of (data config, data step) only, so the skip is exact, and the map is rebuilt from
the list of rollbacks alone. That list is durable before training continues: `<workdir>/spikes.json`
(written atomically by process 0) and a copy in every later checkpoint's metadata, together with the
rule's own state (its window of losses and the length of the current streak) at that step. A resume
therefore applies the same map and restores the same rule state, and reproduces the uninterrupted
run bit for bit wherever it was killed. A budget (`max_rollbacks`) caps the rollbacks; a spike past
it stops the run with exit 3, like a non-finite loss without recovery.

jax-free: the loop does the device reads, the checkpoint restore and the data fetch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from typing import Any, Iterable, Mapping, Sequence

from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class SpikeConfig:
  """Typed `config.spikes` (see configs/base.py for each field)."""

  enabled: bool
  factor: float
  consecutive: int
  window: int
  max_rollbacks: int

  def __post_init__(self):
    if not self.factor > 1:
      raise ValueError(f"config.spikes.factor={self.factor} must be > 1 (a loss above factor x the "
                       "running median counts as a spike).")
    if self.consecutive < 1:
      raise ValueError(f"config.spikes.consecutive={self.consecutive} must be >= 1 (steps in a row).")
    if self.window < 1:
      raise ValueError(f"config.spikes.window={self.window} must be >= 1 (losses in the running "
                       "median).")
    if self.max_rollbacks < 0:
      raise ValueError(f"config.spikes.max_rollbacks={self.max_rollbacks} must be >= 0 (0: stop at "
                       "the first spike, as without recovery).")


class SpikeStop(RuntimeError):
  """A spike that is not rolled back (budget spent, or no checkpoint before it): exit 3."""

  exit_code = exit_codes.NON_FINITE
  traceback = False


@dataclasses.dataclass(frozen=True)
class Spike:
  """What the rule found: the first bad logged step, the step it fired at, and why."""

  first_bad_step: int
  detected_step: int
  reason: str


@dataclasses.dataclass(frozen=True)
class Rollback:
  """One rollback, as recorded: training restarted at `restored_step` reading data step
  `skip_to + 1`; data steps `skip_from..skip_to` (inclusive) are never trained on."""

  restored_step: int
  skip_from: int
  skip_to: int
  first_bad_step: int
  detected_step: int
  reason: str

  def describe(self) -> str:
    return (f"spike at step {self.first_bad_step} ({self.reason}): restored step "
            f"{self.restored_step}, skipped data steps {self.skip_from}-{self.skip_to}")

  def scalars(self) -> dict[str, float]:
    """The numbers of its `rollback` record in metrics.jsonl."""
    return {"restored_step": self.restored_step, "skip_from": self.skip_from,
            "skip_to": self.skip_to, "first_bad_step": self.first_bad_step,
            "detected_step": self.detected_step}


# ------------------------------------------------------------------------------ the data map


def offsets(rollbacks: Sequence[Rollback]) -> list[tuple[int, int]]:
  """(first training step, data offset) pieces of the map, ascending; checks each rollback's range.

  A rollback to r replaces the map from r on: training step s >= r reads data step
  s + skip_to + 1 - r. Raises ValueError when a rollback's `skip_from` is not the data step its
  restored step read (a record that does not belong to this run).
  """
  pieces = [(0, 0)]
  for rb in rollbacks:
    before = _lookup(pieces, rb.restored_step)
    if rb.skip_from != before or rb.skip_to < rb.skip_from:
      raise ValueError(f"rollback {rb} does not follow the ones before it: training step "
                       f"{rb.restored_step} read data step {before}.")
    pieces = [p for p in pieces if p[0] < rb.restored_step] + [
        (rb.restored_step, rb.skip_to + 1 - rb.restored_step)]
  return pieces


def _lookup(pieces: Sequence[tuple[int, int]], step: int) -> int:
  offset = next(off for start, off in reversed(pieces) if start <= step)
  return step + offset


def data_step(rollbacks: Sequence[Rollback], step: int) -> int:
  """The data step that training step `step` (0-based update index) reads after `rollbacks`."""
  return _lookup(offsets(rollbacks), step)


# ------------------------------------------------------------------------------ the rule


class Detector:
  """The spike rule over the sequence of (step, loss, grad_norm), in step order.

  A NaN/Inf loss or gradient norm is a spike at its step. A finite loss above `factor` x the median
  of the `window` losses before it (checked once `window` losses are known) extends the streak;
  `consecutive` in a row make a spike whose first bad step is the streak's first. Every finite loss
  then joins the window. The state (`state()`) is what a checkpoint stores.
  """

  def __init__(self, config: SpikeConfig, state: Mapping[str, Any] | None = None):
    self.config = config
    state = state or {}
    self.losses: list[float] = [float(x) for x in state.get("losses", [])][-config.window:]
    self.streak = int(state.get("streak", 0))

  def state(self) -> dict[str, Any]:
    return {"losses": list(self.losses), "streak": self.streak}

  def observe(self, step: int, loss: float, grad_norm: float = 0.0) -> Spike | None:
    """Takes step `step`'s values; returns the spike this step completes, if any."""
    for name, value in (("loss", loss), ("grad_norm", grad_norm)):
      if not math.isfinite(value):
        return Spike(step, step, f"{name} is {value}")
    cfg = self.config
    if len(self.losses) == cfg.window:
      median = statistics.median(self.losses)
      if loss > cfg.factor * median:
        self.streak += 1
      else:
        self.streak = 0
      if self.streak >= cfg.consecutive:
        first = step - self.streak + 1
        return Spike(first, step, f"loss {loss:.4g} > {cfg.factor:g} x running median {median:.4g}"
                     f" for {self.streak} step(s)")
    self.losses = (self.losses + [float(loss)])[-cfg.window:]
    return None


# ------------------------------------------------------------------------------ the run's record


def _to_json(rollbacks: Iterable[Rollback]) -> list[dict[str, Any]]:
  return [dataclasses.asdict(rb) for rb in rollbacks]


def _from_json(items: Iterable[Mapping[str, Any]]) -> list[Rollback]:
  return [Rollback(**dict(item)) for item in items]


def read_file(workdir: str) -> list[Rollback] | None:
  """The rollbacks recorded in `<workdir>/spikes.json`, or None when there is no such file."""
  text = workdir_lib.read_text_if_exists(workdir_lib.join(workdir, workdir_lib.SPIKES_FILE))
  if text is None:
    return None
  return _from_json(json.loads(text)["rollbacks"])


class Recovery:
  """One run's spike recovery: the recorded rollbacks (hence the data map), the rule and the budget.

  Build with `Recovery.resume`. The map applies whether or not detection is enabled: a checkpoint
  written after a rollback continues on the data stream it was trained on.
  """

  def __init__(self, config: SpikeConfig, workdir: str, rollbacks: Sequence[Rollback],
               detector_state: Mapping[str, Any] | None, *, write: bool):
    self.config, self.workdir, self._write = config, workdir, write
    self.rollbacks = list(rollbacks)
    self._pieces = offsets(self.rollbacks)
    self.detector = Detector(config, detector_state)

  @classmethod
  def resume(cls, config: SpikeConfig, workdir: str, meta: Mapping[str, Any] | None, *,
             write: bool) -> Recovery:
    """The recovery state of a run resumed from a checkpoint with metadata `meta` (None: fresh).

    The rollbacks are the longer of the workdir's file and the checkpoint's copy, one being a prefix
    of the other (a kill after a rollback and before the next save leaves the file one longer).
    """
    saved = dict((meta or {}).get("spikes") or {})
    from_meta = _from_json(saved.get("rollbacks", []))
    path = workdir_lib.join(workdir, workdir_lib.SPIKES_FILE)
    try:
      from_file = read_file(workdir)
    except (ValueError, KeyError, TypeError) as e:
      raise exit_codes.UserError(f"{path} does not read as a record of rollbacks ({e}); restore it "
                                 "from the newest checkpoint's metadata or move it away.") from e
    from_file = from_meta if from_file is None else from_file
    short, long = sorted((from_meta, from_file), key=len)
    if long[:len(short)] != short:
      raise exit_codes.UserError(
          f"{path} lists other rollbacks than checkpoint step {(meta or {}).get('step')}'s metadata "
          f"({[rb.describe() for rb in from_file]} vs {[rb.describe() for rb in from_meta]}); this "
          "workdir mixes two runs: move the file away or use another --workdir.")
    return cls(config, workdir, long, saved.get("detector"), write=write)

  @property
  def detecting(self) -> bool:
    return self.config.enabled

  def data_step(self, step: int) -> int:
    """The data step training step `step` reads."""
    return _lookup(self._pieces, step)

  def observe(self, step: int, loss: float, grad_norm: float) -> Spike | None:
    return self.detector.observe(step, loss, grad_norm)

  def meta(self, step: int) -> dict[str, Any]:
    """What a checkpoint of `step` records: the rollbacks, the rule's state, the next data step."""
    return {"rollbacks": _to_json(self.rollbacks), "next_data_step": self.data_step(step),
            "detector": self.detector.state() if self.detecting else None}

  def plan(self, spike: Spike, checkpoint_steps: Iterable[int]) -> Rollback:
    """The rollback for `spike`; raises SpikeStop past the budget or with nothing to go back to."""
    listed = "; ".join(f"{i + 1}. {rb.describe()}" for i, rb in enumerate(self.rollbacks)) or "none"
    what = f"Loss spike at step {spike.first_bad_step} ({spike.reason}, detected at step " \
           f"{spike.detected_step})"
    if len(self.rollbacks) >= self.config.max_rollbacks:
      raise SpikeStop(f"{what}; stopping: the rollback budget (config.spikes.max_rollbacks="
                      f"{self.config.max_rollbacks}) is spent. Rollbacks so far: {listed}.")
    good = [s for s in checkpoint_steps if s <= spike.first_bad_step - 2]
    if not good:
      raise SpikeStop(f"{what}; stopping: no checkpoint at or before step "
                      f"{spike.first_bad_step - 2} to roll back to (lower checkpoint.save_every). "
                      f"Rollbacks so far: {listed}.")
    restored = max(good)
    return Rollback(restored_step=restored, skip_from=self.data_step(restored),
                    skip_to=self.data_step(spike.detected_step - 1),
                    first_bad_step=spike.first_bad_step, detected_step=spike.detected_step,
                    reason=spike.reason)

  def record(self, rollback: Rollback) -> None:
    """Adds `rollback` to the map and writes the file (atomically) before training continues."""
    self.rollbacks.append(rollback)
    self._pieces = offsets(self.rollbacks)
    if self._write:
      text = json.dumps({"rollbacks": _to_json(self.rollbacks)}, indent=1) + "\n"
      workdir_lib.write_text(workdir_lib.join(self.workdir, workdir_lib.SPIKES_FILE), text)

  def restore_detector(self, meta: Mapping[str, Any]) -> None:
    """The rule's state as the checkpoint with metadata `meta` saved it."""
    self.detector = Detector(self.config, (meta.get("spikes") or {}).get("detector"))

  def missing_records(self, metrics_text: str | None) -> list[Rollback]:
    """Rollbacks without their `rollback` record in metrics.jsonl (a kill between the two writes)."""
    # Skipped ranges never overlap, so a range names its rollback.
    have = {(int(r.get("skip_from", -1)), int(r.get("skip_to", -1)))
            for r in workdir_lib.records(metrics_text) if r.get("split") == "rollback"}
    return [rb for rb in self.rollbacks if (rb.skip_from, rb.skip_to) not in have]
