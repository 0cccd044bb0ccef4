"""Training metrics: TensorBoard event files, a JSONL log, a console line, and lag-one readback.

Only process 0 writes. Device values are read back one step late (`LaggedMetrics`): step k's
metrics are fetched after step k+1 has been dispatched, so the host never waits for the device
between steps and the device never idles waiting for the host.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


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

  def __init__(self, workdir: str, *, total_steps: int, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.total_steps = total_steps
    self._jsonl_path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    self._jsonl = None
    self._t0: float | None = None
    self._step0 = 0
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      # Imported here so processes that never write do not pay for TensorFlow's start-up.
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._scalar_metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")).SerializeToString()
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIR))

  def start(self, step: int) -> None:
    """Marks the step training (re)starts from, for the ETA; drops log records past it on resume.

    After a hard kill the JSONL may hold steps beyond the restored checkpoint; they are re-run now,
    so the older records are removed to keep one record per step (the true loss curve).
    """
    self._t0, self._step0 = time.time(), step
    if not self.enabled:
      return
    if os.path.exists(self._jsonl_path):
      kept = [line for line in _read_lines(self._jsonl_path) if _record_step(line) <= step]
      tmp = self._jsonl_path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self._jsonl_path)
    self._jsonl = open(self._jsonl_path, "a", buffering=1)

  def start_clock(self, step: int) -> None:
    """Restarts the ETA clock at `step` (after compilation, which would skew it)."""
    self._t0, self._step0 = time.time(), step

  def write(self, step: int, scalars: Mapping[str, float], *, prefix: str = "train") -> None:
    """Writes one record of scalars for `step` (names get `prefix/` in TensorBoard)."""
    if not self.enabled:
      return
    with self._tb.as_default(step=step):
      for k, v in scalars.items():
        # tf.summary.scalar lives in the separate `tensorboard` package; the raw write with the
        # scalars plugin's metadata produces the same event record without that dependency.
        self._tf.summary.write(f"{prefix}/{k}", self._tf.constant(float(v), self._tf.float32),
                               metadata=self._scalar_metadata)
    record = {"step": int(step), "split": prefix, **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")

  def console(self, step: int, scalars: Mapping[str, float], *, prefix: str = "train") -> None:
    """Logs one concise line: progress, ETA and the given scalars."""
    if not self.enabled:
      return
    parts = [f"[{prefix}] step {step}/{self.total_steps} ({100.0 * step / max(self.total_steps, 1):.1f}%)"]
    eta = self.eta_seconds(step)
    if eta is not None:
      parts.append(f"eta {format_duration(eta)}")
    parts += [f"{k} {_fmt(v)}" for k, v in scalars.items()]
    logging.info(" | ".join(parts))

  def eta_seconds(self, step: int) -> float | None:
    """Remaining time at the average speed since `start`."""
    if self._t0 is None or step <= self._step0:
      return None
    rate = (time.time() - self._t0) / (step - self._step0)
    return rate * max(self.total_steps - step, 0)

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


def read_metrics(workdir: str, split: str = "train") -> list[dict[str, float]]:
  """Reads back the JSONL records of one split, in file order."""
  path = os.path.join(workdir, METRICS_FILE)
  records = [json.loads(line) for line in _read_lines(path)] if os.path.exists(path) else []
  return [r for r in records if r.get("split") == split]


def _read_lines(path: str) -> list[str]:
  with open(path) as f:
    # A hard kill can leave a partial last line; it has no newline and is dropped.
    return [line for line in f if line.endswith("\n")]


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


def _attended_per_token(seq_len: int, window: int | None) -> float:
  """Mean number of keys a causal query attends to over positions 0..seq_len-1."""
  if window is None or window >= seq_len:
    return (seq_len + 1) / 2.0
  # Positions < window see t+1 keys; the rest see `window`.
  ramp = window * (window + 1) / 2.0
  return (ramp + (seq_len - window) * window) / seq_len


def training_flops_per_token(model_config: Any, seq_len: int) -> float:
  """Model FLOPs of one training token (forward + backward = 3x forward), from the architecture.

  Counts every matmul (2 FLOPs per multiply-add) including the tied output projection and the
  attention score/value products; element-wise work (RG-LRU, Conv1D, norms) is ignored, as in the
  usual 6ND accounting, so MFU is comparable with other reports. `model_config` is a
  `recurrentgemma_tpu.model.ModelConfig`.
  """
  c = model_config
  d, f, r, k, h = c.width, c.mlp_width, c.lru_width_, c.head_dim_, c.num_heads
  mlp = 3 * d * f
  recurrent = 2 * d * r + r * d + 2 * r * (r // c.num_gate_blocks_)
  attention_proj = d * h * k + 2 * d * k + h * k * d  # MQA: one shared K/V head
  forward_macs = c.vocab_size * d  # output logits (the input lookup is free)
  for block in c.block_types:
    forward_macs += mlp
    if block == "recurrent":
      forward_macs += recurrent
    else:
      window = c.attention_window if block == "local_attention" else None
      forward_macs += attention_proj + 2 * h * k * _attended_per_token(seq_len, window)
  return 3.0 * 2.0 * forward_macs


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops_total: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices used."""
  if peak_flops_total <= 0:
    return float("nan")
  return tokens_per_second * flops_per_token / peak_flops_total
