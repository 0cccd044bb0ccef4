"""The training loop end to end: config errors, NaN stop, exact resume after SIGKILL, SIGTERM save."""

import os
import signal
import subprocess

import jax
import numpy as np
import pytest

from recurrentgemma_tpu import experiment as experiment_lib
from recurrentgemma_tpu import metrics as metrics_lib
from recurrentgemma_tpu import trainer
from recurrentgemma_tpu.checkpoints import manager as ckpt
from test_train_common import REPO, small_config, subprocess_env, train_command, wait_for

STEPS = 24


# ---------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides, match", [
    ({"data__global_batch_size": 4}, r"global_batch_size=4 does not fit mesh.*multiple of 8"),
    ({"data__eval_batch_size": 12}, r"eval_batch_size=12 does not fit mesh"),
    ({"optimizer__num_microbatches": 3}, r"does not divide into optimizer.num_microbatches=3"),
    ({"checkpoint__save_every": 2, "checkpoint__keep_every": 3}, r"keep_every=3 must be a multiple"),
    ({"train__steps": 0}, r"train.steps=0 must be > 0"),
    ({"mesh__model": 3}, r"mesh .*model=3"),
    ({"checkpoint__init_from": "/nonexistent/ckpt"}, r"init_from='/nonexistent/ckpt' does not exist"),
])
def test_invalid_configs_fail_before_anything_is_built(overrides, match):
  with pytest.raises(ValueError, match=match) if "init_from" not in str(overrides) else \
      pytest.raises(FileNotFoundError, match=match):
    experiment_lib.build(small_config(**overrides))


def test_unknown_config_key_rejected_on_the_command_line(tmp_path):
  proc = subprocess.run(train_command(str(tmp_path), "--config.train.stepz=5"), cwd=REPO,
                        env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "stepz" in proc.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


# ---------------------------------------------------------------------------- NaN stop


def test_nan_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
  # An absurd learning rate without clipping overflows the parameters within a few steps.
  config = small_config(optimizer__learning_rate=1e30, optimizer__grad_clip_norm=0.0,
                        checkpoint__save_every=1, train__steps=STEPS)
  with pytest.raises(metrics_lib.NonFiniteError, match=r"at step (\d+)") as err:
    trainer.train_and_evaluate(experiment_lib.build(config), str(tmp_path))
  bad_step = int(err.value.args[0].split("at step ")[1].split()[0])
  records = metrics_lib.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == list(range(1, bad_step))  # logged up to the last good step
  assert all(np.isfinite(r["loss"]) for r in records)
  m = ckpt.CheckpointManager(tmp_path / "checkpoints", ckpt.CheckpointOptions(1, 100, 0, False))
  assert m.latest_step() == bad_step - 1
  plan = experiment_lib.build(config)
  params = ckpt.load_params(tmp_path, jax.eval_shape(lambda: _fresh_params(plan)))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  m.close()
  # Resuming that workdir with another data stream is refused instead of silently mixing runs.
  changed = small_config(optimizer__learning_rate=1e30, optimizer__grad_clip_norm=0.0,
                         checkpoint__save_every=1, train__steps=STEPS, data__seed=1)
  with pytest.raises(ValueError, match=r"data.seed: 0 -> 1"):
    trainer.train_and_evaluate(experiment_lib.build(changed), str(tmp_path))


def _fresh_params(plan):
  from recurrentgemma_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  return flax.core.meta.unbox(model_lib.init_params(plan.model, jax.random.key(0)))


# ---------------------------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The same command run uninterrupted, checkpointing every step (a separate process, like the rest).

  It compiles afresh (no persistent cache) while the runs compared with it load their executables
  from the session's compilation cache: equal parameters also show a cached executable computes
  exactly what a fresh compile does."""
  workdir = tmp_path_factory.mktemp("reference")
  out, _ = _start(workdir, "--compilation_cache_dir=", checkpoint__save_every=1).communicate(timeout=600)
  assert "Training completed at step %d" % STEPS in out, out[-4000:]
  return workdir


def _params_at(workdir, step=None):
  path = workdir / "checkpoints" / str(step) if step else workdir
  plan = experiment_lib.build(small_config())
  return jax.device_get(ckpt.load_params(path, jax.eval_shape(lambda: _fresh_params(plan))))


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(str(workdir))]


def _start(workdir, *extra, **overrides):
  return subprocess.Popen(train_command(str(workdir), *extra, train__steps=STEPS, **overrides), cwd=REPO,
                          env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)


def _logged_step(workdir) -> int:
  records = metrics_lib.read_metrics(str(workdir)) if os.path.exists(workdir / "metrics.jsonl") else []
  return records[-1]["step"] if records else 0


@pytest.mark.slow
def test_sigterm_saves_where_it_stops_and_the_resume_reproduces_the_uninterrupted_run(reference,
                                                                                     tmp_path):
  """Preempted (SIGTERM), resumed to the end: same run as `reference`. (A SIGKILL mid-run, whose
  resume redoes the steps after the newest checkpoint and replaces their loss records, is
  tests/test_resume.py's kill storm.)"""
  # 1. SIGTERM to the whole process group, as the local launcher and a VM shutdown send it (its
  # stderr filter child must survive it): the job saves the step it is at and exits with 42.
  proc = _start(tmp_path, checkpoint__save_every=4)
  wait_for(lambda: _logged_step(tmp_path) >= 5, proc, 300, "step 5")
  os.killpg(proc.pid, signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 42, out[-4000:]  # exit_codes.PREEMPTED: the scheduler restarts it
  assert "Stopped for preemption" in out
  m = ckpt.CheckpointManager(tmp_path / "checkpoints", ckpt.CheckpointOptions(4, 100, 0, False))
  preempted_at = m.latest_step()
  m.close()
  # The step the SIGTERM found, saved by the preemption path (it may also be a periodic save step:
  # the trainer runs a few steps between the log read above and the signal's arrival).
  assert 5 < preempted_at < STEPS, preempted_at
  assert f"Stopped for preemption after saving step {preempted_at}." in out, out[-4000:]
  assert preempted_at == _logged_step(tmp_path)  # saved where it stopped
  jax.tree.map(np.testing.assert_array_equal, _params_at(tmp_path, preempted_at),
               _params_at(reference, preempted_at))
  # 2. Resume to the end: loss at every step (one record per step) and the final parameters are
  # identical to the uninterrupted run's.
  proc = _start(tmp_path, checkpoint__save_every=4)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-4000:]
  assert "Resumed from" in out and f"checkpoints at step {preempted_at}." in out, out[-4000:]
  assert _losses(tmp_path) == _losses(reference)
  jax.tree.map(np.testing.assert_array_equal, _params_at(tmp_path), _params_at(reference))
