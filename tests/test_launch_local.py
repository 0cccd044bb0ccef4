"""The local backend for real: `python -m launch.submit --backend=local --num_processes=2` trains
configs/tiny.py (shrunk) with two jax.distributed processes (gloo). One process is SIGKILLed mid-run,
later the other is SIGSTOPped; the launcher restarts the job each time (the second time through its
heartbeat watchdog) and the final parameters equal those of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from launch import state as state_lib
from recurrentgemma_tpu import heartbeat
from test_train_common import REPO, SMALL, assert_resumed_at_the_save, small_config, subprocess_env

STEPS = 30
MIN_HANG_S = 45  # generous: the machine is shared, a live process must never look hung
POLL_S = 0.5


def _submit(workdir, *extra):
  overrides = {**SMALL, "train.steps": STEPS, "checkpoint.save_every": 4}
  argv = ([sys.executable, "-m", "launch.submit", "--backend=local", "--num_processes=2",
           "--config=configs/tiny.py", f"--workdir={workdir}", "--skip_fit_check",
           f"--min_hang={MIN_HANG_S}", "--hang_factor=10", "--startup_timeout=900", "--max_failures=3"]
          + [f"--config.{k}={v}" for k, v in overrides.items()] + list(extra))
  return subprocess.Popen(argv, cwd=REPO, env=subprocess_env(num_devices=1), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait(predicate, proc, what, timeout=600):
  deadline = time.time() + timeout
  while True:
    value = predicate()
    if value:
      return value
    if proc.poll() is not None:
      raise AssertionError(f"launcher exited ({proc.returncode}) before {what}:\n"
                           f"{proc.stdout.read()[-4000:]}")
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


def _training_at(workdir, attempt, process, min_step):
  """The pid of `process` in `attempt` once its heartbeat shows training at >= min_step."""
  st = state_lib.load_state(str(workdir))
  if st.attempt != attempt or st.phase != "running" or len(st.pids) != 2:
    return None
  hb = heartbeat.read_record(str(workdir), process)
  if hb and hb.pid == st.pids[process] and hb.phase == "training" and hb.step >= min_step:
    return hb
  return None


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


@pytest.mark.slow
def test_killed_and_hung_processes_restart_and_reproduce_the_uninterrupted_run(tmp_path):
  faulty = tmp_path / "faulty"
  proc = _submit(faulty)
  # 1. SIGKILL process 1 while it trains: the launcher sees it die and restarts both.
  hb = _wait(lambda: _training_at(faulty, 1, 1, 6), proc, "attempt 1 training")
  os.kill(hb.pid, signal.SIGKILL)
  # 2. SIGSTOP process 0 of the restarted job: alive but silent; only the watchdog can tell.
  hb = _wait(lambda: _training_at(faulty, 2, 0, 1), proc, "attempt 2 training")
  hb = _wait(lambda: _training_at(faulty, 2, 0, hb.step + 2), proc, "attempt 2 progress")
  os.kill(hb.pid, signal.SIGSTOP)
  stopped_at = time.time()
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-4000:]

  st = state_lib.load_state(str(faulty))
  assert (st.phase, st.attempt, st.failures, st.preemptions) == ("done", 3, 2, 0), st
  failed = [e for e in st.history if e["event"] == "failed"]
  assert "killed by signal 9" in failed[0]["detail"]
  assert "hung: no heartbeat for" in failed[1]["detail"]
  # The watchdog's bound: killed once the newest heartbeat is older than max(min_hang, 10 x step
  # time), noticed within one poll; not before (a live process is never killed as hung).
  silent = float(failed[1]["detail"].split("no heartbeat for ")[1].split("s")[0])
  assert silent >= MIN_HANG_S  # printed rounded to whole seconds
  assert failed[1]["time"] - stopped_at <= MIN_HANG_S + 30  # loose: the machine is shared
  logs = [(faulty / "logs" / f"process_{i}.log").read_text() for i in range(2)]
  assert all(l.count("===== rg-launch attempt") == 3 for l in logs)

  reference = tmp_path / "reference"
  proc = _submit(reference)
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-4000:]
  assert state_lib.load_state(str(reference)).attempt == 1
  jax.tree.map(np.testing.assert_array_equal, _params(faulty), _params(reference))
  # Re-submitting a finished run does nothing and succeeds.
  proc = _submit(reference)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "already complete" in out, out[-2000:]
