"""The training loop: config -> mesh + model + data -> jitted train step -> metrics and checkpoints.

`train_and_evaluate(exp, workdir)` is the whole job (`exp`: a validated `experiment.Experiment`); `python -m recurrentgemma_tpu.train` only
parses flags and calls it. The same code runs on one CPU and on every host of a TPU pod: each
process feeds its own rows of the global batch, process 0 writes logs, all processes checkpoint.

Exact resume: the global batch of step k is a function of (data config, k) only, the train step is
deterministic, and a checkpoint holds the parameters, optimizer state and step. Re-running the same
command after any interruption therefore reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from recurrentgemma_tpu import data as data_lib
from recurrentgemma_tpu import experiment as experiment_lib
from recurrentgemma_tpu import metrics as metrics_lib
from recurrentgemma_tpu import model as model_lib
from recurrentgemma_tpu import train_step as train_step_lib
from recurrentgemma_tpu.checkpoints import manager as ckpt_lib
from sharding import chips as chips_lib
from sharding import mesh as mesh_lib

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
# Metrics that stop training when they are NaN or Inf.
_WATCHED = ("loss", "grad_norm")
# Steps the host may dispatch ahead of the device (2: one running, one queued).
MAX_IN_FLIGHT = 2


class NonFiniteError(RuntimeError):
  """Training produced a NaN/Inf loss or gradient norm; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What `train_and_evaluate` did.

  Attributes:
    status: "completed" (reached train.steps), "preempted" (saved on SIGTERM and stopped) or
      "already_done" (the workdir's checkpoint was already at train.steps).
    step: the step the returned state is at.
    eval: the last evaluation's metrics (loss, perplexity, accuracy), empty if none ran.
  """

  status: str
  step: int
  eval: dict[str, float]


# ------------------------------------------------------------------------------------ preemption


class PreemptionWatch:
  """Turns SIGTERM into "save at the next step boundary and stop".

  Single process: a Python SIGTERM handler sets a flag. Several processes: JAX's preemption service
  (started by `jax.distributed.initialize`) catches the signal on whichever host receives it and
  agrees on one step for all hosts via `reached_preemption_sync_point`, which must then be asked at
  every step; a Python handler would replace its native one, so none is installed.
  """

  def __init__(self):
    self._requested = threading.Event()
    self._previous = None
    self._multiprocess = jax.process_count() > 1
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint at the next step boundary, then exiting.")
    self._requested.set()

  def reached(self, step: int) -> bool:
    """True when training should save and stop after `step` (call at every step)."""
    if self._multiprocess:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


# ------------------------------------------------------------------------------------ helpers


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def state_item(state: train_step_lib.TrainState) -> dict[str, Any]:
  """The non-parameter part of the train state, as saved in the checkpoint's `state` item."""
  return {"step": state.step, "opt_state": state.opt_state}


def abstract_checkpoint(fns: train_step_lib.StepFunctions) -> tuple[Any, Any]:
  """Restore targets (params, state item) laid out on `fns`'s mesh: restoring reshards onto it."""
  return (_abstract(fns.abstract_state.params, fns.state_shardings.params),
          _abstract(state_item(fns.abstract_state), state_item(fns.state_shardings)))


def peak_flops_per_device(configured: float = 0.0) -> float:
  """`configured` if set, else the chip table's peak (TPU), else a measured matmul peak (CPU)."""
  if configured:
    return configured
  device = jax.devices()[0]
  if device.platform == "tpu":
    return chips_lib.chip_for_device_kind(device.device_kind).peak_bf16_flops
  if device.platform == "cpu":
    # Virtual CPU devices share the same cores, so the whole host's matmul rate is split among them.
    return metrics_lib.measure_matmul_peak() / jax.local_device_count()
  return 0.0  # GPUs: set train.peak_flops_per_device; MFU is reported as NaN meanwhile.


def evaluate(fns: train_step_lib.StepFunctions, params: Any, pipeline: data_lib.Pipeline) -> dict[str, float]:
  """Mean loss, perplexity and accuracy over the validation batches (padding excluded)."""
  sharding = fns.batch_shardings["inputs"]
  size = pipeline.config.eval_batch_size
  rows = data_lib.process_rows(sharding, size)
  total = None
  for local in pipeline.eval_batches(rows):
    out = fns.eval_step(params, data_lib.to_global_arrays(local, sharding, size))
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  host = {k: float(v) for k, v in jax.device_get(total).items()}
  tokens = max(host["num_tokens"], 1.0)
  loss = host["loss_sum"] / tokens
  return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "accuracy": host["correct"] / tokens,
          "num_tokens": host["num_tokens"]}


def _mean_records(records: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
  keys = records[-1][1].keys()
  return {k: float(np.mean([m[k] for _, m in records])) for k in keys}


def _diff(saved: Any, current: Any, path: str, changed: list[str], one_sided: list[str]) -> None:
  """Collects `path: saved -> current` for differing leaves and paths present on one side only."""
  if isinstance(saved, dict) and isinstance(current, dict):
    for key in sorted(set(saved) | set(current)):
      if key not in saved or key not in current:
        one_sided.append(f"{path}.{key}")
      else:
        _diff(saved[key], current[key], f"{path}.{key}", changed, one_sided)
  elif saved != current:
    changed.append(f"{path}: saved {saved!r}, now {current!r}")


def _write_config(workdir: str, exp: experiment_lib.Experiment) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(exp.to_json())


# ------------------------------------------------------------------------------------ the loop


class Trainer:
  """One training run in a workdir: `initial_state()` (resume / init_from / fresh), then `run()`."""

  def __init__(self, exp: experiment_lib.Experiment, workdir: str):
    self.exp, self.workdir = exp, workdir
    self.mesh = mesh_lib.create_mesh(exp.mesh)
    self.fns = train_step_lib.build_step_functions(exp.model, exp.optimizer, self.mesh,
                                                   exp.mesh.strategy)
    self.pipeline = data_lib.make_pipeline(exp.data)
    self.ckpt = ckpt_lib.CheckpointManager(os.path.join(workdir, CHECKPOINT_DIR), exp.checkpoint)
    self.writer = metrics_lib.MetricsWriter(workdir, total_steps=exp.train.steps)
    self.lagged = metrics_lib.LaggedMetrics()
    self.interval: list[tuple[int, dict[str, float]]] = []
    self.tokens_per_step = exp.tokens_per_step
    self.flops_per_token = metrics_lib.training_flops_per_token(exp.model, exp.data.seq_len)
    self.peak_total = peak_flops_per_device(exp.train.peak_flops_per_device) * jax.device_count()
    self.last_eval: dict[str, float] = {}

  # ---------------------------------------------------------------- state

  def initial_state(self) -> tuple[train_step_lib.TrainState, int]:
    """Resumes from the newest readable checkpoint, else initialises (optionally from init_from)."""
    fns = self.fns
    abstract_params, abstract_rest = abstract_checkpoint(fns)
    restored = self.ckpt.restore_latest(abstract_params, abstract_rest)
    if restored is not None:
      self._check_resumable(restored.meta)
      state = train_step_lib.TrainState(step=restored.state["step"], params=restored.params,
                                        opt_state=restored.state["opt_state"])
      logging.info("Resumed from %s at step %d.", self.ckpt.directory, restored.step)
      return state, restored.step
    if self.exp.init_from:
      params = ckpt_lib.load_params(self.exp.init_from, abstract_params)
      opt_state = jax.jit(fns.tx.init, out_shardings=fns.state_shardings.opt_state)(params)
      state = train_step_lib.TrainState(
          step=jax.device_put(jnp.zeros((), jnp.int32), fns.state_shardings.step), params=params,
          opt_state=opt_state)
      logging.info("Initialised parameters from %s.", self.exp.init_from)
      return state, 0
    return fns.create_state(jax.random.key(self.exp.train.seed)), 0

  def _check_resumable(self, meta: dict[str, Any]) -> None:
    """Refuses to resume with a different model or data stream, which would silently change results.

    Fields that exist on one side only (the code gained or lost a config field since the save) are
    reported as a warning: their default is assumed to keep the old behaviour.
    """
    saved = json.loads(meta.get("config", "{}"))
    current = json.loads(self.exp.to_json())
    changed, one_sided = [], []
    for group in ("model", "data"):
      _diff(saved.get(group, {}), current.get(group, {}), f"config.{group}", changed, one_sided)
    if one_sided:
      logging.warning("Resuming although these config fields exist on one side only: %s", one_sided)
    if changed:
      raise ValueError(
          f"The checkpoint in {self.ckpt.directory} was trained with a different model/data config; "
          f"resuming would not continue the same run: {'; '.join(changed)}. Use a new --workdir "
          "(or --init_from to start from its parameters).")

  def save(self, state: train_step_lib.TrainState, step: int) -> None:
    # Never write a state whose own step went non-finite: check it first (this blocks on step).
    self.drain(keep_newest=0)
    meta = {"config": self.exp.to_json(), "seed": self.exp.train.seed,
            "data": {"next_step": step, "global_batch_size": self.exp.data.global_batch_size,
                     "seq_len": self.exp.data.seq_len},
            "process_count": jax.process_count(), "device_count": jax.device_count()}
    if self.ckpt.save(step, state.params, state_item(state), meta):
      logging.info("Saving checkpoint for step %d (async=%s).", step, self.exp.checkpoint.async_save)

  # ---------------------------------------------------------------- metrics

  def drain(self, keep_newest: int) -> None:
    """Reads back finished steps' metrics; stops training on NaN/Inf."""
    records = self.lagged.pop(keep_newest=keep_newest)
    bad = metrics_lib.first_nonfinite(records, _WATCHED)
    if bad is not None:
      step, key, value = bad
      # Keep the loss curve up to the last good step in the logs before stopping.
      for good_step, m in self.interval + [r for r in records if r[0] < step]:
        self.writer.write(good_step, m)
      self.interval = []
      self.writer.flush()
      raise NonFiniteError(
          f"{key} is {value} at step {step} (the update from step {step - 1}); stopping. The newest "
          f"checkpoint in {self.ckpt.directory} (step {self.ckpt.latest_step()}) predates it.")
    self.interval.extend(records)

  def log(self, upto: int, seconds: float, steps: int) -> None:
    """Writes the mean of the drained records up to step `upto` plus speed figures."""
    records = [r for r in self.interval if r[0] <= upto]
    self.interval = [r for r in self.interval if r[0] > upto]
    if not records:
      return
    scalars = _mean_records(records)
    # An interval holding only the first (compiling) step has no meaningful speed.
    step_time = seconds / steps if steps > 0 else float("nan")
    tokens_per_second = self.tokens_per_step / step_time
    scalars.update(step_time=step_time, tokens_per_second=tokens_per_second,
                   mfu=metrics_lib.mfu(tokens_per_second, self.flops_per_token, self.peak_total))
    self.writer.write(upto, scalars)
    self.writer.console(upto, {k: scalars[k] for k in
                               ("loss", "grad_norm", "learning_rate", "tokens_per_second", "mfu")})

  def run_eval(self, state: train_step_lib.TrainState, step: int, *, record: bool = True) -> None:
    self.last_eval = evaluate(self.fns, state.params, self.pipeline)
    if record:
      self.writer.write(step, self.last_eval, prefix="eval")
    self.writer.console(step, {k: self.last_eval[k] for k in ("loss", "perplexity", "accuracy")},
                        prefix="eval")
    self.writer.flush()

  # ---------------------------------------------------------------- loop

  def run(self) -> TrainResult:
    train = self.exp.train
    state, step = self.initial_state()
    _write_config(self.workdir, self.exp)
    self.writer.start(step)
    if step >= train.steps:
      logging.info("Checkpoint is at step %d >= train.steps=%d: nothing to train.", step, train.steps)
      self.run_eval(state, step, record=False)  # already in the logs from the run that got here
      self.writer.close()
      self.ckpt.close()
      return TrainResult("already_done", step, self.last_eval)
    watch = PreemptionWatch()
    sharding = self.fns.batch_shardings["inputs"]
    status = "completed"
    in_flight: collections.deque[jax.Array] = collections.deque()
    try:
      start = step
      # step_log: last step written to the logs; step_timed: the step at t_log (speed figures).
      t_log, step_log, step_timed, paused = time.time(), step, step, 0.0
      while step < train.steps:
        batch = data_lib.global_batch(self.pipeline, step, sharding)
        state, metrics = self.fns.train_step(state, batch)
        step += 1
        self.lagged.push(step, metrics)
        # Bound how far the host runs ahead: the device always has the next step queued, but a
        # SIGTERM is acted on within MAX_IN_FLIGHT steps and step times are measured, not queued.
        in_flight.append(metrics["loss"])
        if len(in_flight) > MAX_IN_FLIGHT:
          jax.block_until_ready(in_flight.popleft())
        if step == start + 1:
          # Keep compilation out of the speed figures: time from the end of the first step.
          jax.block_until_ready(metrics)
          logging.info("First step (including compilation) took %.1f s.", time.time() - t_log)
          t_log, step_timed, paused = time.time(), step, 0.0
          self.writer.start_clock(step)
        # Lag one step: read back the previous boundary's metrics now that this step is queued.
        if (step - 1) % train.log_every == 0 and step - 1 > step_log:
          self.drain(keep_newest=1)
          now = time.time()
          self.log(step - 1, now - t_log - paused, step - 1 - step_timed)
          t_log, step_log, step_timed, paused = now, step - 1, step - 1, 0.0
        preempted = watch.reached(step)
        saving = preempted or self.ckpt.is_periodic_step(step) or step == train.steps
        evaluating = train.eval_every and step % train.eval_every == 0 and step < train.steps
        if saving or evaluating:
          # Finish (and NaN-check) the queued steps first: that wait is training time, the save's
          # host copy and the evaluation are not.
          self.drain(keep_newest=0)
          t = time.time()
          if saving:
            self.save(state, step)
          if evaluating and not preempted:
            self.run_eval(state, step)
          paused += time.time() - t
        if preempted:
          status = "preempted"
          logging.warning("Stopped for preemption after saving step %d.", step)
          break
      self.drain(keep_newest=0)
      if step > step_log:
        self.log(step, time.time() - t_log - paused, step - step_timed)
      if status == "completed":
        self.run_eval(state, step)
    finally:
      watch.close()
      self.ckpt.close()
      self.writer.close()
    return TrainResult(status, step, self.last_eval)


def train_and_evaluate(exp: experiment_lib.Experiment, workdir: str) -> TrainResult:
  """Trains (or resumes) the model of `exp` in `workdir`, evaluating and checkpointing.

  Args:
    exp: a validated experiment (`experiment.build`); its checks ran before any compile.
    workdir: output directory: checkpoints/, tensorboard/, metrics.jsonl, config.json.

  Returns:
    A TrainResult. Raises NonFiniteError on NaN/Inf.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  return Trainer(exp, workdir).run()
