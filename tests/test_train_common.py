"""Shared helpers of the training-loop tests (no tests here): the tiny preset, shrunk further."""

import json
import os
import re
import subprocess
import sys
import time

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Overrides that shrink configs/tiny.py to a model and data stream that run a step in milliseconds
# on CPU while keeping every block type (recurrent, recurrent, local attention).
SMALL = {
    "model.vocab_size": 1024,
    "model.width": 64,
    "model.num_layers": 3,
    "model.lru_width": 64,
    "model.attention_window": 32,
    "data.seq_len": 64,
    "data.global_batch_size": 8,
    "data.eval_batch_size": 8,
    "data.num_eval_batches": 2,
    "data.sources.default.max_documents": 400,
    "optimizer.warmup_steps": 2,
    "optimizer.decay_steps": 100,
    "train.log_every": 1,
    "train.eval_every": 0,
    "checkpoint.save_every": 2,
    "checkpoint.keep_last": 100,
}


def small_config(**overrides) -> ml_collections.ConfigDict:
  """configs/tiny.py with SMALL and `overrides` (dotted keys with '__' for '.') applied, locked."""
  sys.path.insert(0, REPO)
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.lock()
  for key, value in {**SMALL, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
    *path, leaf = key.split(".")
    node = config
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def train_command(workdir: str, *extra: str, **overrides) -> list[str]:
  """The README's main job, shrunk with SMALL and `overrides`, as a subprocess argv."""
  values = {**SMALL, **{k.replace("__", "."): v for k, v in overrides.items()}}
  return ([sys.executable, "-m", "recurrentgemma_tpu.train", "--config=configs/tiny.py",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in values.items()] + list(extra))


def subprocess_env(num_devices: int = 8) -> dict[str, str]:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def readable_tail(out: str, chars: int = 4000) -> str:
  """The end of a subprocess's output, less the list of loaded extension modules that Python prints
  after a fatal error (thousands of characters that would push the error itself out of view)."""
  return re.sub(r"\nExtension modules: [^\n]*", "\n[extension module list left out]", out)[-chars:]


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
  """Polls `predicate` until true; fails if `proc` exits first or the timeout passes."""
  deadline = time.time() + timeout
  while not predicate():
    if proc.poll() is not None:
      out = proc.stdout.read() if proc.stdout else ""
      raise AssertionError(f"process exited (rc={proc.returncode}) before {what}:\n{out[-4000:]}")
    if time.time() > deadline:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.02)


def assert_resumed_at_the_save(workdir, saved: int) -> None:
  """A re-run after a SIGKILLed launcher resumed at its trainer's save: its start-up block names
  that step with no damage, and no logged step was trained twice."""
  log = (workdir / "logs" / "process_0.log").read_text()
  last = log.split("===== rg-launch attempt")[-1]
  assert f"newest checkpoint step {saved};" in last and "is damaged" not in last, log[-3000:]
  trained = [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()
             if '"split": "train"' in l]
  assert len(trained) == len(set(trained)), trained
