"""Training metrics: TensorBoard event files, a JSONL log, a console line, and the step logger.

Only process 0 writes. Device values are read back one step late (`LaggedMetrics`): step k's
metrics are fetched after step k+1 has been dispatched, so the host never waits for the device
between steps and the device never idles waiting for the host. `StepLogger` owns everything the
loop reports: that readback, the NaN/Inf check, interval means, step time, tokens/s, MFU and ETA,
all measured on one clock that excludes compilation, saves and evaluations.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from recurrentgemma_tpu import events
from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import workdir as workdir_lib



class LaggedMetrics:
  """Holds device metric dicts until they are ready, then returns them as Python floats."""

  def __init__(self):
    self._pending: list[tuple[int, Mapping[str, jax.Array]]] = []

  def push(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    """Records the (still running) metrics of `step`."""
    self._pending.append((step, metrics))

  def pop(self, *, keep_newest: int = 1) -> list[tuple[int, dict[str, float]]]:
    """Fetches all but the newest `keep_newest` pending steps (which may still be running)."""
    n = max(len(self._pending) - keep_newest, 0)
    ready, self._pending = self._pending[:n], self._pending[n:]
    if not ready:
      return []
    # One device_get for the whole interval: a single sync instead of one per step.
    host = jax.device_get([m for _, m in ready])
    return [(step, {k: float(np.asarray(v)) for k, v in m.items()}) for (step, _), m in zip(ready, host)]

  def __len__(self) -> int:
    return len(self._pending)


class NonFiniteError(RuntimeError):
  """Training produced a NaN/Inf loss or gradient norm; the last good checkpoint is kept."""

  exit_code = exit_codes.NON_FINITE
  traceback = False


def first_nonfinite(records: Iterable[tuple[int, Mapping[str, float]]],
                    keys: Iterable[str]) -> tuple[int, str, float] | None:
  """The first (step, key, value) whose value is NaN or Inf, or None."""
  keys = tuple(keys)
  for step, m in records:
    for k in keys:
      if k in m and not math.isfinite(m[k]):
        return step, k, m[k]
  return None


class MetricsWriter:
  """Writes scalars to TensorBoard, `metrics.jsonl` and the console (on process 0 only)."""

  def __init__(self, workdir: str, *, total_steps: int, enabled: bool | None = None,
               listener: Callable[[int, str, Mapping[str, float]], None] | None = None):
    """`listener(step, prefix, scalars)` is called after each record is written (goodput)."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._listener = listener
    self.total_steps = total_steps
    self._jsonl_path = workdir_lib.join(workdir, workdir_lib.METRICS_FILE)
    self._tb = None
    self._jsonl = None
    if self.enabled:
      workdir_lib.makedirs(workdir)
      # Its file is created at the first write: a run refused at start-up, or re-run with nothing
      # to do, leaves none.
      self._tb = events.EventWriter(workdir_lib.join(workdir, workdir_lib.TENSORBOARD_DIR))

  def start(self, step: int) -> None:
    """Opens the log at the step training (re)starts from; drops log records past it on resume.

    After a hard kill the JSONL may hold steps beyond the restored checkpoint; they are re-run now,
    so the older records are removed to keep one record per step (the true loss curve).
    """
    if not self.enabled:
      return
    if workdir_lib.exists(self._jsonl_path):
      kept = [line for line in _read_lines(self._jsonl_path) if _record_step(line) <= step]
      workdir_lib.write_text(self._jsonl_path, "".join(kept))
    self._jsonl = workdir_lib.open_append(self._jsonl_path)

  def write(self, step: int, scalars: Mapping[str, float], *, prefix: str = "train") -> None:
    """Writes one record of scalars for `step` (names get `prefix/` in TensorBoard)."""
    if not self.enabled:
      return
    self._tb.scalars(step, {f"{prefix}/{k}": v for k, v in scalars.items()})
    record = {"step": int(step), "split": prefix, **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    if self._listener is not None:
      self._listener(step, prefix, scalars)

  def console(self, step: int, scalars: Mapping[str, float], *, prefix: str = "train",
              eta: float | None = None) -> None:
    """Logs one concise line: progress, ETA (seconds, if known) and the given scalars."""
    if not self.enabled:
      return
    parts = [f"[{prefix}] step {step}/{self.total_steps} ({100.0 * step / max(self.total_steps, 1):.1f}%)"]
    if eta is not None and math.isfinite(eta):
      parts.append(f"eta {format_duration(eta)}")
    parts += [f"{k} {_fmt(v)}" for k, v in scalars.items()]
    logging.info(" | ".join(parts))

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      if self._jsonl:
        self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      if self._jsonl:
        self._jsonl.close()
        self._jsonl = None


# Metrics that stop training when they are NaN or Inf.
WATCHED = ("loss", "grad_norm")
_CONSOLE = ("loss", "grad_norm", "learning_rate", "tokens_per_second", "mfu")


class StepLogger:
  """Reads back, checks and reports the train step's metrics; the loop calls it at every step.

  One clock (`time.perf_counter`) serves step time, tokens/s, MFU and ETA. It starts when the first
  step (which includes compilation) has finished, and time spent inside `paused()` (checkpoint
  saves, evaluations) is not counted. Step k's metrics are read back after step k+1 is dispatched
  (`LaggedMetrics`); a NaN/Inf loss or gradient norm raises `NonFiniteError` after the records of
  the steps before it are written.
  """

  def __init__(self, writer: MetricsWriter, *, start_step: int, total_steps: int, log_every: int,
               tokens_per_step: int, flops_per_token: float, peak_flops_total: float,
               describe_checkpoint: Any = lambda: "no checkpoint was written yet",
               stop_on_nonfinite: bool = True):
    self.writer = writer
    self.total_steps, self.log_every = total_steps, log_every
    self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
    self.peak_flops_total = peak_flops_total
    self._describe_checkpoint = describe_checkpoint
    self._stop_on_nonfinite = stop_on_nonfinite  # False: loss-spike recovery checks them (spikes.py)
    self._lagged = LaggedMetrics()
    self._records: list[tuple[int, dict[str, float]]] = []  # read back, not yet logged
    self._start = start_step
    self._logged = start_step  # last step written to the log
    self._clock_step: int | None = None  # step at which the clock started (after compilation)
    self._clock_t = 0.0
    self._paused = 0.0  # seconds inside paused() since the clock started
    self._mark_step, self._mark_t, self._mark_paused = start_step, 0.0, 0.0  # last log line
    self.last_step_time: float | None = None
    self._warned_mfu = False

  def push(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    """Takes the (still running) metrics of `step`; logs the previous boundary when it is due."""
    self._lagged.push(step, metrics)
    if self._clock_step is None:
      # The first step includes compilation: wait for it and start the clock after it.
      jax.block_until_ready(metrics)
      now = time.perf_counter()
      logging.info("First step (including compilation) done.")
      self._clock_step, self._clock_t = step, now
      self._mark_step, self._mark_t, self._mark_paused = step, now, 0.0
    if (step - 1) % self.log_every == 0 and step - 1 > self._logged:
      self._read(keep_newest=1)  # lag one step: step-1 is read while `step` runs
      self._log(step - 1)

  def flush(self) -> None:
    """Reads back every pushed step (blocking) and NaN-checks it (before a save or evaluation)."""
    self._read(keep_newest=0)

  def finish(self) -> None:
    """Reads back and logs everything left (end of training or preemption)."""
    self._read(keep_newest=0)
    if self._records:
      self._log(self._records[-1][0])

  @contextlib.contextmanager
  def paused(self):
    """Time inside is neither training time nor ETA time (saves, evaluations)."""
    t = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - t

  def eta_seconds(self, step: int) -> float | None:
    """Remaining time at the mean training speed since the clock started (None before that)."""
    if self._clock_step is None or step <= self._clock_step:
      return None
    rate = (time.perf_counter() - self._clock_t - self._paused) / (step - self._clock_step)
    return rate * max(self.total_steps - step, 0)

  def _read(self, keep_newest: int) -> None:
    records = self._lagged.pop(keep_newest=keep_newest)
    bad = first_nonfinite(records, WATCHED) if self._stop_on_nonfinite else None
    if bad is not None:
      step, key, value = bad
      # Keep the loss curve up to the last good step in the logs before stopping.
      for good_step, m in self._records + [r for r in records if r[0] < step]:
        self.writer.write(good_step, m)
      self._records = []
      self.writer.flush()
      raise NonFiniteError(
          f"{key} is {value} at step {step} (the update from step {step - 1}); stopping. "
          f"{self._describe_checkpoint()}.")
    self._records.extend(records)

  def _log(self, upto: int) -> None:
    records = [r for r in self._records if r[0] <= upto]
    self._records = [r for r in self._records if r[0] > upto]
    if not records:
      return
    keys = records[-1][1].keys()
    scalars = {k: float(np.mean([m[k] for _, m in records])) for k in keys}
    now = time.perf_counter()
    steps = upto - self._mark_step
    # An interval holding only the first (compiling) step has no meaningful speed.
    step_time = (now - self._mark_t - (self._paused - self._mark_paused)) / steps if steps > 0 \
        else float("nan")
    tokens_per_second = self.tokens_per_step / step_time
    utilisation = mfu(tokens_per_second, self.flops_per_token, self.peak_flops_total)
    if utilisation > 1:  # the peak is wrong (a CPU peak measured under load), not the run
      if not self._warned_mfu:
        logging.warning("MFU %.2f > 1 against a peak of %.3g FLOP/s: the peak is too low; MFU is "
                        "reported as NaN (set train.peak_flops_per_device, or delete %s in the "
                        "workdir to measure it again).", utilisation, self.peak_flops_total, PEAK_FILE)
        self._warned_mfu = True
      utilisation = float("nan")
    scalars.update(step_time=step_time, tokens_per_second=tokens_per_second, mfu=utilisation)
    if steps > 0:
      self.last_step_time = step_time
    self.writer.write(upto, scalars)
    self.writer.console(upto, {k: scalars[k] for k in _CONSOLE if k in scalars},
                        eta=self.eta_seconds(upto))
    self._logged = upto
    self._mark_step, self._mark_t, self._mark_paused = upto, now, self._paused


def read_metrics(workdir: str, split: str = "train") -> list[dict[str, float]]:
  """Reads back the JSONL records of one split, in file order."""
  path = workdir_lib.join(workdir, workdir_lib.METRICS_FILE)
  records = [json.loads(line) for line in _read_lines(path)] if workdir_lib.exists(path) else []
  return [r for r in records if r.get("split") == split]


def _read_lines(path: str) -> list[str]:
  # A hard kill can leave a partial last line; it has no newline and is dropped.
  return [line + "\n" for line in workdir_lib.read_text(path).split("\n")[:-1]]


def _record_step(line: str) -> int:
  return int(json.loads(line)["step"])


def _fmt(v: float) -> str:
  if v == 0 or 1e-3 <= abs(v) < 1e5:
    return f"{v:.4g}"
  return f"{v:.3e}"


def format_duration(seconds: float) -> str:
  """`1h02m`, `3m05s` or `12s`."""
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  if h:
    return f"{h}h{m:02d}m"
  if m:
    return f"{m}m{s:02d}s"
  return f"{s}s"


# -------------------------------------------------------------------- FLOPs and MFU


def measure_matmul_peak(n: int = 1024, repeats: int = 5, dtype: Any = jnp.float32) -> float:
  """Measured FLOP/s of an n x n matmul on the first local device (the CPU "chip peak").

  CPUs have no datasheet peak that XLA reaches, so MFU on CPU is relative to what XLA's own matmul
  achieves on this machine; on TPU/GPU the chip table in `sharding/` gives the datasheet peak.
  """
  x = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n**3 / best


def cpu_peak_cache_path() -> str:
  """~/.cache/recurrentgemma_tpu/cpu_peak.json (XDG_CACHE_HOME respected)."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "recurrentgemma_tpu", "cpu_peak.json")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform  # pylint: disable=g-import-not-at-top
  return platform.processor() or platform.machine()


def cached_cpu_peak() -> float:
  """`measure_matmul_peak` of this host, measured once and cached per CPU model, core count and jax.

  Each run re-measuring the peak on a busy machine made MFU incomparable between runs (0.33 and 0.23
  for nearly the same tokens/s). A measurement taken while the load average exceeds the core count is
  used for that run but not cached. Delete the cache file to measure again.
  """
  key = f"{_cpu_model()} | {os.cpu_count()} cores | jax {jax.__version__}"
  path = cpu_peak_cache_path()
  try:
    with open(path) as f:
      cached = json.load(f)
  except (OSError, ValueError):
    cached = {}
  if isinstance(cached.get(key), (int, float)) and cached[key] > 0:
    return float(cached[key])
  peak = measure_matmul_peak()
  load = os.getloadavg()[0]
  if load > (os.cpu_count() or 1):
    # Other work shares the cores: this figure can be many times too low (12 GFLOP/s was measured
    # at load 28 on a host that reaches 265 idle), and a cached bad peak would inflate every later
    # run's MFU. Use it for this run only.
    logging.warning("CPU matmul peak %.1f GFLOP/s measured at load average %.1f on %d cores: not "
                    "cached (MFU of this run is against it).", peak / 1e9, load, os.cpu_count())
    return peak
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump({**cached, key: peak}, f, indent=1)
    os.replace(tmp, path)
  except OSError:
    pass  # a read-only home: this run still has its measurement
  return peak


# The per-device peak a run's MFU is against, written at its first start and read on every resume.
PEAK_FILE = "peak_flops.json"


def run_peak_flops_per_device(workdir: str, measure: Callable[[], float], *, write: bool) -> float:
  """One peak per run: the one stored in `workdir`, else `measure()` (stored when `write`).

  A CPU peak is measured (`cached_cpu_peak`), and a measurement under load can be several times too
  low; measured again at a resume, it made one run's MFU jump from 0.40 to 1.25-1.76. Keeping the
  run's first figure keeps its MFU comparable from start to end.
  """
  path = workdir_lib.join(workdir, PEAK_FILE)
  if workdir_lib.exists(path):
    try:
      stored = float(json.loads(workdir_lib.read_text(path))["peak_flops_per_device"])
    except (ValueError, KeyError, TypeError):
      stored = 0.0  # unreadable: measure again and replace it
    if stored > 0:
      return stored
  peak = measure()
  if write and peak > 0:
    workdir_lib.write_text(path, json.dumps({"peak_flops_per_device": peak}) + "\n")
  return peak


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops_total: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices used.

  `flops_per_token` comes from the one FLOP model, `model.flops.training_flops_per_token`.
  """
  if peak_flops_total <= 0:
    return float("nan")
  return tokens_per_second * flops_per_token / peak_flops_total
