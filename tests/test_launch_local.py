"""The local backend for real.

`launch.jobs.submit` trains configs/tiny.py (shrunk) with two jax.distributed processes (gloo) as
a one-trial sweep's trial. The job is preempted (SIGTERM to both processes), then one process is
SIGKILLed, then the other is SIGSTOPped; the launcher restarts the job each time (the third time
through its heartbeat watchdog). Its final parameters equal those of an uninterrupted run of the
same job (`python -m launch.submit`), and its goodput ledger adds up to the measured wall-clock time
and counts exactly the steps that were trained twice. Both hosts resume at the same step, and the
two-process job's losses equal those of the job run in one process (up to reduction order).
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from launch import jobs
from launch import spec as spec_lib
from launch import state as state_lib
from launch.sweep import definition
from launch.sweep import report
from recurrentgemma_tpu import goodput
from recurrentgemma_tpu import heartbeat
from recurrentgemma_tpu import workdir as workdir_lib
from test_train_common import REPO, SMALL, small_config, subprocess_env

STEPS, SAVE_EVERY = 32, 8  # few saves: each costs seconds on a busy machine
# Generous (the machine is shared: a live process must never look hung), and below jax.distributed's
# own heartbeat timeout (100 s), after which the process left running would exit by itself.
MIN_HANG_S = 45
OVERRIDES = {**SMALL, "train.steps": STEPS, "checkpoint.save_every": SAVE_EVERY}

_SWEEP = """
import ml_collections
from launch.sweep.axes import product, sweep

def get_sweep(arg=""):
  s = ml_collections.ConfigDict()
  s.name = "goodput"
  s.base = "configs/tiny.py"
  s.overrides = {}
  s.choices = {"family": {"hawk": {"model": {"block_pattern": "hawk"}}}}
  s.axes = product(sweep("family", ["hawk"]))
  s.tokens = {"rule": "config"}
  s.lr = {"rule": "config"}
  s.metric = "eval/loss"
  s.retries = 1
  return s
"""


def _submit(workdir, *extra):
  """`python -m launch.submit` of the job (the same overrides and budgets) as a subprocess."""
  argv = ([sys.executable, "-m", "launch.submit", "--backend=local", "--num_processes=2",
           "--config=configs/tiny.py", f"--workdir={workdir}", "--skip_fit_check",
           f"--min_hang={MIN_HANG_S}", "--hang_factor=10", "--startup_timeout=900", "--max_failures=3"]
          + [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + list(extra))
  return subprocess.Popen(argv, cwd=REPO, env=subprocess_env(num_devices=1), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _params(workdir):
  from recurrentgemma_tpu import experiment as experiment_lib
  from recurrentgemma_tpu import model as model_lib
  from recurrentgemma_tpu.checkpoints import manager as ckpt
  import flax
  plan = experiment_lib.build(small_config(train__steps=STEPS))
  shapes = jax.eval_shape(lambda: flax.core.meta.unbox(
      model_lib.init_params(plan.model, jax.random.key(0))))
  # Saved by two processes; restored here onto one device of this process.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), shapes)
  return jax.device_get(ckpt.load_params(workdir / "checkpoints" / str(STEPS), abstract))


def _train_losses(workdir):
  text = workdir_lib.read_text_if_exists(os.path.join(workdir, workdir_lib.METRICS_FILE))
  return [(r["step"], r["loss"]) for r in workdir_lib.records(text) if r.get("split") == "train"]


def _train_steps_logged(workdir):
  return [step for step, _ in _train_losses(workdir)]


def _inject_faults(workdir, done, out):
  """Attempt 1: SIGTERM to both processes (a preemption); 2: SIGKILL to process 1 (both frozen
  first, so the metrics read while frozen are process 0's last, two or more steps past a save); 3: SIGSTOP to process 0 while its
  heartbeat says training (alive but silent: only the watchdog can tell). Each waits until the
  attempt has logged two steps past every step logged before it started (a preempted attempt logs
  steps after the SIGTERM). `out` gets (signal, metrics steps logged at that moment) per fault, or
  an exception."""
  try:
    for attempt, sig in ((1, signal.SIGTERM), (2, signal.SIGKILL), (3, signal.SIGSTOP)):
      floor = None
      while not done.is_set():
        st = state_lib.load_state(workdir)
        if st.attempt == attempt and st.phase == "running" and len(st.pids) == 2:
          steps = _train_steps_logged(workdir)
          if floor is None:  # the earlier attempts' processes have all exited: their last steps
            floor = max(steps, default=0)
          last = steps[-1] if steps else 0
          if last >= floor + 2 and sig == signal.SIGTERM:
            break
          if last >= floor + 2 and sig == signal.SIGKILL and last % SAVE_EVERY >= 2:
            for pid in st.pids:
              os.killpg(pid, signal.SIGSTOP)
            frozen = _train_steps_logged(workdir)
            if frozen[-1] % SAVE_EVERY >= 2:  # no save since two steps before the last logged
              break
            for pid in st.pids:  # a save slipped in before the freeze: a later step
              os.killpg(pid, signal.SIGCONT)
          if last >= floor + 2 and sig == signal.SIGSTOP:
            os.kill(st.pids[0], signal.SIGSTOP)
            # The heartbeat cannot change while its writer is stopped: the watchdog judges this one.
            hb = heartbeat.read_record(workdir, 0)
            if hb and hb.pid == st.pids[0] and hb.phase == "training":
              break
            os.kill(st.pids[0], signal.SIGCONT)  # saving: a hang is judged on a later step
        time.sleep(0.01)
      else:
        return
      if sig == signal.SIGKILL:
        out.append((sig, frozen))
        os.kill(st.pids[1], signal.SIGKILL)  # the launcher then kills the frozen process 0
        try:
          os.killpg(st.pids[1], signal.SIGCONT)  # process 1's stderr filter child may finish
        except OSError:
          pass
      elif sig == signal.SIGTERM:
        out.append((sig, _train_steps_logged(workdir)))
        for pid in st.pids:
          os.killpg(pid, signal.SIGTERM)  # a preemption: every host gets SIGTERM
      else:
        out.append((sig, _train_steps_logged(workdir)))
  except Exception as e:  # pylint: disable=broad-except
    out.append(e)


def _resumed_at(log, attempt, process=0):
  """The step attempt `attempt` of `process` resumed from, as its own log line says."""
  section = log.split(f"===== rg-launch attempt {attempt} process {process}")[1].split(
      "===== rg-launch")[0]
  return int(re.search(r"Resumed from \S+ at step (\d+)\.", section).group(1))


def _tensorboard_goodput(workdir):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  by_step = {}
  for name in sorted(os.listdir(os.path.join(workdir, "tensorboard"))):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, "tensorboard", name)):
      for v in event.summary.value:
        if v.tag.startswith("goodput/"):
          by_step.setdefault(event.step, {})[v.tag[len("goodput/"):]] = float(tf.make_ndarray(v.tensor))
  return by_step


@pytest.mark.slow
def test_a_preempted_killed_and_hung_local_job_reproduces_the_uninterrupted_run_and_its_ledger_adds_up(
    tmp_path, monkeypatch):
  sweep_file = tmp_path / "goodput_sweep.py"
  sweep_file.write_text(_SWEEP)
  sweep = definition.load_sweep(str(sweep_file))
  trials = definition.expand(sweep)
  root = str(tmp_path / "root")
  workdir = os.path.join(root, "trials", trials[0].id)  # the run is also a one-trial sweep's trial
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  spec = spec_lib.JobSpec(
      config="configs/tiny.py", overrides=tuple(f"{k}={v}" for k, v in OVERRIDES.items()),
      workdir=workdir, backend="local", target=None, num_processes=2,
      budgets=spec_lib.Budgets(max_preemptions=5, max_failures=3, startup_timeout_s=900,
                               min_hang_s=MIN_HANG_S, hang_factor=10))
  done, faults = threading.Event(), []
  injector = threading.Thread(target=_inject_faults, args=(workdir, done, faults), daemon=True)
  injector.start()
  t0 = time.time()
  try:
    rc = jobs.submit(spec, skip_fit_check=True)
  finally:
    t1 = time.time()
    done.set()
    injector.join()
  assert rc == 0 and [f[0] for f in faults] == [signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP], faults
  st = state_lib.load_state(workdir)
  assert (st.phase, st.attempt, st.preemptions, st.failures) == ("done", 4, 1, 2), st
  failed = [e for e in st.history if e["event"] == "failed"]
  assert "killed by signal 9" in failed[0]["detail"]
  # The watchdog's rule: killed once the newest heartbeat is older than max(min_hang, 10 x step
  # time), not before (a live process is never killed as hung). Only the watchdog writes "hung",
  # and it did so before jax.distributed's own 100 s heartbeat timeout ended the job otherwise: no
  # clock is read here.
  assert "hung: no heartbeat for" in failed[1]["detail"]
  silent = float(failed[1]["detail"].split("no heartbeat for ")[1].split("s")[0])
  assert silent >= MIN_HANG_S  # printed rounded to whole seconds
  logs = [open(os.path.join(workdir, "logs", f"process_{i}.log")).read() for i in range(2)]
  assert all(l.count("===== rg-launch attempt") == 4 for l in logs)

  # The steps trained twice, from the metrics records alone: those logged before a fault that lie
  # after the step the next attempt resumed from (its own log line says which).
  redone = sum(sum(1 for s in steps if s > _resumed_at(logs[0], attempt + 2))
               for attempt, (_, steps) in enumerate(faults))
  assert redone >= 1  # the SIGKILL came after the newest save

  ledger = goodput.read(workdir)
  measured = t1 - t0
  print(f"measured {measured:.2f}s, {redone} steps redone; the ledger:", *ledger.lines(), sep="\n")
  assert sum(ledger.seconds.values()) == pytest.approx(ledger.wall_clock_s, rel=1e-9)
  assert sum(ledger.seconds.values()) == pytest.approx(measured, rel=0.01)
  assert ledger.work_lost_steps == redone
  assert (ledger.productive_steps, ledger.attempts) == (STEPS, 4)
  for category in ("productive", "queued", "startup", "compile", "checkpoint", "evaluation",
                   "work_lost"):
    assert ledger.seconds[category] > 0, (category, ledger)

  # launch.status --goodput shows that ledger.
  lines = []
  jobs.status(workdir, goodput=True, log=lines.append)
  assert lines[-len(ledger.lines()):] == ledger.lines()
  assert f"({redone} steps redone)" in "\n".join(lines) and "  attempts 4, rollbacks 0" in "\n".join(lines)

  # TensorBoard: each attempt that returned (the preempted one and the last) wrote its ledger; the
  # SIGKILLed and the hung one could not.
  board = _tensorboard_goodput(workdir)
  assert [v["attempts"] for _, v in sorted(board.items())] == [1, 4]
  final = board[STEPS]
  assert final["work_lost_steps"] == redone and final["productive_steps"] == STEPS
  assert sum(final[f"{c}_s"] for c in goodput.CATEGORIES) == pytest.approx(final["wall_clock_s"],
                                                                          rel=1e-4)
  # The trainer's own window ends when it returns, a little before the launcher's last event.
  assert ledger.wall_clock_s - 30 < final["wall_clock_s"] <= ledger.wall_clock_s

  # The sweep totals of a one-trial sweep are this ledger.
  status = report.status_table(root, trials, sweep.retries)
  assert "\n".join(ledger.lines()[1:]) in status and "sweep goodput over 1 trials:" in status
  report.collect(root, sweep, trials)
  (row,) = [json.loads(l) for l in open(os.path.join(root, "results.jsonl"))]
  assert row["goodput"] == pytest.approx(ledger.scalars())
  totals = json.load(open(os.path.join(root, "goodput.json")))
  assert totals["total"] == pytest.approx(ledger.scalars())

  # Both hosts resumed each restart at the same step, and process 1 knew it was one of two.
  for attempt in (2, 3, 4):
    assert _resumed_at(logs[1], attempt, process=1) == _resumed_at(logs[0], attempt)
  assert "jax.distributed: process 1 of 2." in logs[1]

  # The same job uninterrupted, submitted from the command line: the same parameters, bit for bit,
  # and a checkpoint at every save step.
  reference = tmp_path / "reference"
  proc = _submit(reference)
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-4000:]
  assert state_lib.load_state(str(reference)).attempt == 1
  jax.tree.map(np.testing.assert_array_equal, _params(pathlib.Path(workdir)),
               _params(reference))
  assert sorted(int(s) for s in os.listdir(reference / "checkpoints")) == list(
      range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
  # Two processes train what one process does (the same global batches; up to reduction order):
  # the job in this process, on this process's devices.
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import trainer  # pylint: disable=g-import-not-at-top
  one = tmp_path / "one_process"
  trainer.train_and_evaluate(experiment_lib.build(small_config(**{
      k.replace(".", "__"): v for k, v in OVERRIDES.items()})), str(one))
  two, one = _train_losses(reference), _train_losses(one)
  assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=1e-4)
  # Re-submitting a finished run does nothing and succeeds.
  proc = _submit(reference)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "already complete" in out, out[-2000:]
