"""The training loop: Experiment -> mesh + model + data -> jitted train step -> metrics and checkpoints.

`train_and_evaluate(exp, workdir)` is the whole job (`exp`: a validated `experiment.Experiment`);
`python -m recurrentgemma_tpu.train` only parses flags, calls it and maps the outcome to an exit code.
The same code runs on one CPU and on every host of a TPU pod: each process feeds its own rows of the
global batch, process 0 writes logs, all processes checkpoint.

The concerns live beside it: resume policy in `checkpoints/resume.py`, reporting (readback, NaN
check, speed, ETA) in `metrics.StepLogger`, SIGTERM in `preemption.py`, liveness in `heartbeat.py`,
loss-spike rollbacks and the data steps they skip in `spikes.py`.

Exact resume: the global batch of step k is a function of (data config, k) only, the train step is
deterministic, and a checkpoint holds the parameters, optimizer state and step. Re-running the same
command after any interruption therefore reproduces the uninterrupted run bit for bit. A run is
complete when its last step is checkpointed *and* its final evaluation is in the log; a run killed
between the two evaluates when it is re-run.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
from typing import Any, Iterable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from recurrentgemma_tpu import data as data_lib
from recurrentgemma_tpu import executable as executable_lib
from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import experiment as experiment_lib
from recurrentgemma_tpu import goodput as goodput_lib
from recurrentgemma_tpu import heartbeat as heartbeat_lib
from recurrentgemma_tpu import metrics as metrics_lib
from recurrentgemma_tpu import preemption
from recurrentgemma_tpu import profiling
from recurrentgemma_tpu import spikes as spikes_lib
from recurrentgemma_tpu import step_functions
from recurrentgemma_tpu import train_step as train_step_lib
from recurrentgemma_tpu import workdir as workdir_lib
from recurrentgemma_tpu.checkpoints import manager as ckpt_lib
from recurrentgemma_tpu.checkpoints import resume as resume_lib
from recurrentgemma_tpu.model import flops as flops_lib
from sharding import chips as chips_lib
from sharding import mesh as mesh_lib

# Steps the host may dispatch ahead of the device (2: one running, one queued).
MAX_IN_FLIGHT = 2
# JAX persistent compilation cache of `python -m recurrentgemma_tpu.train` when --compilation_cache_dir
# is not given: this env var if set (the tests share one directory per session), else the run's own
# `<workdir>/compilation_cache` (gs:// on pods), else (no workdir given) a per-user dir.
COMPILATION_CACHE_ENV = "RECURRENTGEMMA_TPU_COMPILATION_CACHE"
DEFAULT_COMPILATION_CACHE_DIR = os.path.join("~", ".cache", "recurrentgemma_tpu", "jax")



@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What `train_and_evaluate` did.

  Attributes:
    status: "completed" (reached train.steps and evaluated), "preempted" (saved on SIGTERM and
      stopped) or "already_done" (the workdir was already complete: nothing trained or evaluated).
    step: the step the returned state is at.
    eval: the final evaluation's metrics (loss, perplexity, accuracy), empty if preempted.
  """

  status: str
  step: int
  eval: dict[str, float]


# ------------------------------------------------------------------------------------ helpers


def enable_compilation_cache(path: str | None = None, *, workdir: str | None = None) -> str:
  """Points JAX's persistent compilation cache at `path`; call before anything is compiled.

  A restarted or re-submitted job (preemption, a crash, a launcher restart) then loads its compiled
  steps instead of compiling them again; the cache key covers the program, the devices and the
  jax/XLA versions, so a hit runs the same executable a fresh compile would build. Every compile is
  cached, however short: on a restart each one is on the critical path. Only process 0 writes
  (jax's rule). Multi-process CPU jobs (gloo) run without it: their cached executables were
  measured not to reproduce fresh compiles bit for bit. Call after jax.distributed.initialize.

  Args:
    path: a local directory or a URL (gs://...); None: $RECURRENTGEMMA_TPU_COMPILATION_CACHE if set,
      else `<workdir>/compilation_cache`, else ~/.cache/recurrentgemma_tpu/jax; "": no persistent cache.
    workdir: the run directory (local or gs://), whose cache travels with the run.

  Returns:
    The directory in use, or "" when the cache is off.
  """
  if path is None:
    path = os.environ.get(COMPILATION_CACHE_ENV) or (
        workdir_lib.join(workdir_lib.resolve(workdir), workdir_lib.COMPILATION_CACHE_DIR) if workdir
        else DEFAULT_COMPILATION_CACHE_DIR)
  if path and jax.process_count() > 1 and jax.default_backend() == "cpu":
    # Measured (docs/training.md): a 2-process gloo job whose restarts loaded cached executables
    # ended with parameters ~1e-5 away from one compiled afresh, which breaks exact resume.
    logging.warning("Compilation cache off: multi-process CPU (gloo) executables loaded from it "
                    "do not reproduce freshly compiled ones bit for bit.")
    path = ""
  if not path:
    jax.config.update("jax_enable_compilation_cache", False)
    return ""
  if "://" not in path:
    path = os.path.abspath(os.path.expanduser(path))
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise exit_codes.UserError(
          f"compilation cache directory {path} cannot be created ({e.strerror}); pass a writable "
          "--compilation_cache_dir, or --compilation_cache_dir= to run without a compilation "
          "cache.") from e
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  # jax's default puts a GPU autotuning directory under `path` into the compile options, and so
  # into every cache key: a run directory copied or moved elsewhere then missed on every program
  # (measured); without it the key does not depend on where the cache lives.
  jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
  return path


def peak_flops_per_device(configured: float = 0.0) -> float:
  """`configured` if set, else the chip table's peak (TPU), else the host's matmul peak (CPU), measured
  once per machine and cached (`metrics.cached_cpu_peak`) so that MFU compares across runs."""
  if configured:
    return configured
  device = jax.devices()[0]
  if device.platform == "tpu":
    return chips_lib.chip_for_device_kind(device.device_kind).peak_bf16_flops
  if device.platform == "cpu":
    # Virtual CPU devices share the same cores, so the whole host's matmul rate is split among them.
    return metrics_lib.cached_cpu_peak() / jax.local_device_count()
  return 0.0  # GPUs: set train.peak_flops_per_device; MFU is reported as NaN meanwhile.


def evaluate(fns: step_functions.StepFunctions, params: Any, pipeline: data_lib.Pipeline) -> dict[str, float]:
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


def _write_config(workdir: str, exp: experiment_lib.Experiment) -> None:
  if jax.process_index() == 0:
    workdir_lib.write_text(workdir_lib.join(workdir, workdir_lib.CONFIG_FILE), exp.to_json())


def _all_agree(value: bool) -> bool:
  """Process 0's `value` on every process (decisions read from process 0's files)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.int32(value)))


# ------------------------------------------------------------------------------------ the loop


class Trainer:
  """One training run in a workdir: resume or initialise, train, save, evaluate."""

  def __init__(self, exp: experiment_lib.Experiment, workdir: str, *,
               accept_changes: Iterable[str] = ()):
    self.exp, self.workdir = exp, workdir
    self.accept_changes = tuple(accept_changes)
    self.goodput = goodput_lib.Recorder(workdir, enabled=jax.process_index() == 0)
    self.heartbeat = heartbeat_lib.Heartbeat(workdir, jax.process_index(), self.goodput.phase)
    self.heartbeat.beat("starting", 0)
    self.profiler = profiling.OnDemand(workdir, jax.process_index())  # launch.profile's requests
    self.mesh = mesh_lib.create_mesh(exp.mesh)
    self.fns = step_functions.build_step_functions(exp.model, exp.optimizer, self.mesh,
                                                   exp.mesh.strategy)
    self.pipeline: data_lib.Pipeline | None = None  # built after the resume check (it may be slow)
    self.spikes: spikes_lib.Recovery | None = None  # the data map and spike rule, set on resume
    self.ckpt = ckpt_lib.CheckpointManager(workdir_lib.join(workdir, workdir_lib.CHECKPOINT_DIR), exp.checkpoint)
    self.writer = metrics_lib.MetricsWriter(workdir, total_steps=exp.train.steps,
                                            listener=self.goodput.on_metrics)
    self.downstream = None  # config.eval: lm-eval tasks every N steps (lm-eval imported only then)
    if exp.eval.every:
      from recurrentgemma_tpu.downstream import evaluation  # pylint: disable=g-import-not-at-top
      self.downstream = evaluation.DuringTraining(exp.eval, self.fns, exp.data, workdir)

  # ---------------------------------------------------------------- pieces

  def initial_state(self) -> tuple[train_step_lib.TrainState, int]:
    """Resumes from the newest intact checkpoint, else initialises (see checkpoints/resume.py)."""
    resumed = resume_lib.restore_or_init(self.exp, self.fns, self.ckpt, self.accept_changes)
    self.spikes = spikes_lib.Recovery.resume(self.exp.spikes, self.workdir, resumed.meta,
                                             write=jax.process_index() == 0)
    return resumed.state, resumed.step

  def prepare_data(self) -> None:
    """Builds the data pipeline (preparing the stores on first use); bad sources are user errors."""
    try:
      self.pipeline = data_lib.make_pipeline(self.exp.data)
    except (ValueError, FileNotFoundError) as e:
      raise exit_codes.UserError(f"config.data: {e}") from e

  def save(self, state: train_step_lib.TrainState, step: int) -> None:
    """Starts saving `step` (the caller has NaN-checked it)."""
    self.heartbeat.beat("saving", step)
    data = self.exp.data
    meta = {"config": self.exp.to_json(), "seed": self.exp.train.seed,
            "data": {"next_step": step, "global_batch_size": data.global_batch_size,
                     "seq_len": data.seq_len},
            "process_count": jax.process_count(), "device_count": jax.device_count(),
            "spikes": self.spikes.meta(step)}
    if self.ckpt.save(step, state.params, resume_lib.state_item(state), meta):
      logging.info("Saving checkpoint for step %d (async=%s).", step, self.exp.checkpoint.async_save)

  def evaluate(self, state: train_step_lib.TrainState, step: int) -> dict[str, float]:
    """Evaluates, writes the `eval` record for `step` and logs it."""
    self.heartbeat.beat("evaluating", step)
    result = evaluate(self.fns, state.params, self.pipeline)
    self.writer.write(step, result, prefix="eval")
    self.writer.console(step, {k: result[k] for k in ("loss", "perplexity", "accuracy")}, prefix="eval")
    self.writer.flush()
    return result

  def _describe_checkpoint(self) -> str:
    latest = self.ckpt.latest_step()
    if latest is None:
      return f"No checkpoint was written yet in {self.ckpt.directory}"
    return f"The newest checkpoint in {self.ckpt.directory} (step {latest}) predates it"

  # ---------------------------------------------------------------- loop

  def run(self) -> TrainResult:
    try:
      result = self._run()
    except BaseException:
      self.goodput.exit()
      self._close(quiet=True)
      raise
    # The end-of-run goodput ledger: logged, and TensorBoard scalars unless nothing ran.
    self.goodput.summarize(result.step, None if result.status == "already_done" else
                           functools.partial(self.writer.write, prefix="goodput"))
    self._close(quiet=False)
    return result

  def _run(self) -> TrainResult:
    steps = self.exp.train.steps
    try:  # a prepared store that is missing or made for other settings: exit 2 before any compile
      data_lib.check_store(self.exp.data)
    except data_lib.StoreError:
      raise  # names the store and the prepare command already
    except (ValueError, FileNotFoundError) as e:
      raise exit_codes.UserError(f"config.data: {e}") from e
    state, step = self.initial_state()  # refuses a changed run before data or arrays are touched
    self.prepare_data()
    _write_config(self.workdir, self.exp)
    self.writer.start(step)
    self._write_rollback_records()
    trained = step < steps
    if trained:
      with preemption.deferred() as watch:
        state, step, preempted = self._train(state, step, watch)
      if preempted:
        logging.warning("Stopped for preemption after saving step %d.", step)
        return TrainResult("preempted", step, {})
    if preemption.requested():  # arrived after the last step was dispatched: evaluate on restart
      raise preemption.Preempted(f"SIGTERM after step {step} was saved; the final evaluation runs "
                                 "when the job is restarted.")
    # The final evaluation belongs to completion: a run killed before its record was written
    # evaluates now; a complete one only reports the record.
    record = (workdir_lib.final_evaluation(workdir_lib.read_text_if_exists(
        workdir_lib.join(self.workdir, workdir_lib.METRICS_FILE)), step)
              if jax.process_index() == 0 else None)
    if _all_agree(record is not None):
      logging.info("Workdir is complete at step %d (train.steps=%d): nothing to do.", step, steps)
      result = {k: v for k, v in (record or {}).items() if k not in ("step", "split")}
      status = "already_done"
    else:
      result = self.evaluate(state, step)
      status = "completed"
    self.heartbeat.beat("done", step)
    return TrainResult(status, step, result)

  def _peak_flops_per_device(self) -> float:
    """`train.peak_flops_per_device` if set, else this run's one stored peak (see metrics)."""
    if self.exp.train.peak_flops_per_device:
      return self.exp.train.peak_flops_per_device
    return metrics_lib.run_peak_flops_per_device(self.workdir, peak_flops_per_device,
                                                 write=jax.process_index() == 0)

  def _step_logger(self, step: int) -> metrics_lib.StepLogger:
    exp = self.exp
    return metrics_lib.StepLogger(
        self.writer, start_step=step, total_steps=exp.train.steps, log_every=exp.train.log_every,
        tokens_per_step=exp.tokens_per_step,
        flops_per_token=flops_lib.training_flops_per_token(exp.model, exp.data.seq_len),
        peak_flops_total=self._peak_flops_per_device() * jax.device_count(),
        describe_checkpoint=self._describe_checkpoint,
        stop_on_nonfinite=not self.spikes.detecting)  # with recovery, the spike rule decides

  def _read_back(self, in_flight: collections.deque, keep: int) -> spikes_lib.Spike | None:
    """Waits for all but the newest `keep` in-flight steps; with spike recovery on, applies the rule
    to their loss and gradient norm (in step order) and returns the first spike."""
    while len(in_flight) > keep:
      step, metrics = in_flight.popleft()
      if not self.spikes.detecting:
        jax.block_until_ready(metrics["loss"])
        continue
      loss, grad_norm = jax.device_get((metrics["loss"], metrics["grad_norm"]))
      spike = self.spikes.observe(step, float(loss), float(grad_norm))
      if spike is not None:
        in_flight.clear()  # steps after the spike are trained again from the restored checkpoint
        return spike
    return None

  def _roll_back(self, spike: spikes_lib.Spike) -> tuple[train_step_lib.TrainState, int]:
    """Restores the newest checkpoint before `spike` and skips the data trained on since then.

    The abandoned steps' checkpoints are moved aside first and the skip is written before training
    goes on, so a kill at any point re-runs into the same state (see spikes.py).
    """
    self.ckpt.wait_until_finished()
    rollback = self.spikes.plan(spike, self.ckpt.all_steps())  # SpikeStop (exit 3) past the budget
    for later in [s for s in self.ckpt.all_steps() if s > rollback.restored_step]:
      self.ckpt.set_aside(later, self.ckpt.rolled_back_dir)
    self.spikes.record(rollback)
    logging.warning("Rolled back after a loss spike (%d of at most %d): %s.",
                    len(self.spikes.rollbacks), self.exp.spikes.max_rollbacks, rollback.describe())
    resumed = resume_lib.restore_step(self.fns, self.ckpt, rollback.restored_step)
    self.spikes.restore_detector(resumed.meta)
    self.writer.write(rollback.detected_step, rollback.scalars(), prefix="rollback")
    self.writer.flush()
    return resumed.state, rollback.restored_step

  def _write_rollback_records(self) -> None:
    """The `rollback` records a kill between the skip file and metrics.jsonl did not write."""
    if jax.process_index() != 0 or not self.spikes.rollbacks:
      return
    text = workdir_lib.read_text_if_exists(workdir_lib.join(self.workdir, workdir_lib.METRICS_FILE))
    for rollback in self.spikes.missing_records(text):
      self.writer.write(rollback.detected_step, rollback.scalars(), prefix="rollback")
    self.writer.flush()

  def _train(self, state: train_step_lib.TrainState, step: int,
             watch: preemption.Watch) -> tuple[train_step_lib.TrainState, int, bool]:
    exp = self.exp
    logger = self._step_logger(step)
    sharding = self.fns.batch_shardings["inputs"]
    in_flight: collections.deque[tuple[int, dict[str, jax.Array]]] = collections.deque()
    preempted = False
    self.heartbeat.beat("compiling", step)
    # The launcher's shipped executable when it was built for exactly this job, else a compile.
    train_fn, source = executable_lib.train_step(self.fns, exp, self.workdir, warn=logging.warning)
    logging.info("Train step: %s.", source)
    while step < exp.train.steps and not preempted:
      with self.goodput.data_wait(), jax.profiler.TraceAnnotation(profiling.DATA_WAIT):
        batch = data_lib.global_batch(self.pipeline, self.spikes.data_step(step), sharding)
      state, metrics = train_fn(state, batch)
      step += 1
      logger.push(step, metrics)
      # Bound how far the host runs ahead: the device always has the next step queued, but a
      # SIGTERM is acted on within MAX_IN_FLIGHT steps and step times are measured, not queued.
      in_flight.append((step, metrics))
      spike = self._read_back(in_flight, keep=MAX_IN_FLIGHT)
      self.ckpt.check_save()  # a failed background save stops the job now, naming its step
      self.heartbeat.training(step, logger.last_step_time)
      with logger.paused():  # a capture's start and its digest are not training time
        self.profiler.step_boundary(step, in_flight)
      preempted = watch.reached(step)
      saving = preempted or self.ckpt.is_periodic_step(step) or step == exp.train.steps
      evaluating = exp.train.eval_every and step % exp.train.eval_every == 0 and step < exp.train.steps
      downstream = self.downstream is not None and self.downstream.due(step) and not preempted
      if spike is None and (saving or evaluating or downstream):
        spike = self._read_back(in_flight, keep=0)  # the rule has seen every step before a save
      if spike is not None:
        state, step = self._roll_back(spike)
        logger = self._step_logger(step)
        continue
      if saving or evaluating or downstream:
        logger.flush()  # never save or evaluate a state whose step went non-finite
        with logger.paused():
          if saving:
            self.save(state, step)
          if evaluating and not preempted:
            self.evaluate(state, step)
          if downstream:
            self.heartbeat.beat("evaluating", step)
            self.downstream(state.params, step)
    self.profiler.finish(step, in_flight)
    logger.finish()
    with logger.paused():
      self.heartbeat.beat("saving", step)
      self.ckpt.wait_until_finished()
    return state, step, preempted

  def _close(self, quiet: bool) -> None:
    """Finishes pending saves and closes the writers; `quiet` when another error is on its way."""
    if self.pipeline is not None:
      self.pipeline.close()  # stops reading ahead
    try:
      self.ckpt.close()
    except ckpt_lib.SaveFailed:
      if not quiet:
        raise
    finally:
      self.writer.close()


def train_and_evaluate(exp: experiment_lib.Experiment, workdir: str, *,
                       accept_changes: Iterable[str] = ()) -> TrainResult:
  """Trains (or resumes) the model of `exp` in `workdir`, evaluating and checkpointing.

  Args:
    exp: a validated experiment (`experiment.build`); its checks ran before any compile.
    workdir: output directory: checkpoints/, tensorboard/, metrics.jsonl, config.json, heartbeat/.
    accept_changes: config fields (dotted, fnmatch patterns) allowed to differ from the checkpoint's.

  Returns:
    A TrainResult. Raises NonFiniteError on NaN/Inf, exit_codes.UserError (e.g. ResumeRefused) on a
    bad workdir or a refused resume, preemption.Preempted on SIGTERM outside the loop, and
    checkpoints.manager.SaveFailed when a save fails.
  """
  workdir = workdir_lib.prepare(workdir)
  return Trainer(exp, workdir, accept_changes=accept_changes).run()
