"""Resume under faults, on one uninterrupted reference run (`finished`, a real
`python -m recurrentgemma_tpu.train` subprocess on CPU).

In real subprocesses: a kill storm (SIGKILL at start-up, mid-save and mid-final-evaluation,
restarted until done) must end bitwise equal to the reference with its final evaluation recorded
once; so must a re-run after the newest checkpoint was changed on disk (it falls back, sets the step
aside and trains on); a storage that fails every read moves nothing and exits 1 with one line; a
changed config is refused naming the fields, with only the hints that can work, every checkpoint
left in place; SIGTERM before the loop and user errors give their exit codes
(recurrentgemma_tpu/exit_codes.py) with one clear line. In this process, on copies of the
reference's checkpoints: each kind of damage to the newest step falls back to the previous one
naming the file and its error, and damage to every step moves nothing and names each.
"""

import glob
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from recurrentgemma_tpu import experiment as experiment_lib
from recurrentgemma_tpu import heartbeat
from recurrentgemma_tpu import metrics as metrics_lib
from recurrentgemma_tpu.checkpoints import manager as ckpt
from recurrentgemma_tpu.checkpoints import resume
from checkpoint_damage import DAMAGE_KINDS, HARMLESS, damage, garble_chunk
from recurrentgemma_tpu import step_functions
from sharding import mesh as mesh_lib
from test_train_common import (REPO, readable_tail, small_config, subprocess_env, train_command,
                               wait_for)

STEPS = 12


@pytest.fixture(scope="module")
def env():
  """Subprocess environment; restarts load their compiled steps from the session's compilation
  cache (tests/conftest.py), which the bitwise comparisons below therefore also cover."""
  return subprocess_env()


def _start(workdir, env, *extra, **overrides):
  values = {"train__steps": STEPS, "checkpoint__save_every": 2, **overrides}
  return subprocess.Popen(train_command(str(workdir), *extra, **values), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


@pytest.fixture(scope="module")
def finished(tmp_path_factory, env):
  """The uninterrupted reference run (checkpoints at 2, 4, ..., 12 and the final evaluation)."""
  workdir = tmp_path_factory.mktemp("finished")
  rc, out = _finish(_start(workdir, env))
  assert rc == 0 and f"Training completed at step {STEPS}" in out, out[-4000:]
  return workdir


def _tree_listing(root):
  return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
                for d, _, files in os.walk(root) for f in files)


def _params(workdir):
  exp = experiment_lib.build(small_config())
  from recurrentgemma_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(lambda: flax.core.meta.unbox(model_lib.init_params(exp.model, jax.random.key(0))))
  return jax.device_get(ckpt.load_params(workdir, abstract))


def _logged_step(workdir) -> int:
  records = metrics_lib.read_metrics(str(workdir)) if os.path.exists(workdir / "metrics.jsonl") else []
  return records[-1]["step"] if records else 0


def _checkpoint(workdir, targets, step=STEPS):
  """(params, state item) of one step of `workdir`, restored on this process's 8 devices."""
  m = _manager(workdir / "checkpoints")
  restored = m.restore(step, *targets)
  m.close()
  return jax.device_get((restored.params, restored.state))


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(str(workdir))]


# ---------------------------------------------------------------------------- refused changes


CHANGES = [  # (override, the field named, which hints can work)
    ({"model__width": 128, "model__lru_width": 128}, "model.width: 64 -> 128", "nothing"),
    ({"model__block_pattern": "hawk"}, "model.block_pattern: ", "nothing"),  # another architecture
    ({"optimizer__learning_rate": 1e-3}, "optimizer.learning_rate: 0.003 -> 0.001", "all"),
]


def _assert_refusal(text, field, fits):
  assert field in text and "Nothing was moved" in text and "another --workdir" in text, text
  # --init_from and --accept_config_changes only where the checkpoint's arrays fit the request.
  assert ("--init_from=" in text) == (fits == "all"), text
  assert (f"--accept_config_changes={field.split(':')[0]}" in text) == (fits == "all"), text


@pytest.mark.slow
@pytest.mark.parametrize("override, field, fits", CHANGES)
def test_changed_config_is_refused_with_hints_that_can_work(finished, tmp_path, override, field,
                                                            fits):
  """The resume policy on the run's newest real checkpoint, in this process, with the requested
  model and optimizer built as the trainer builds them (the trainer's line and exit 2: the next
  test)."""
  directory = _copy_checkpoints(finished, tmp_path, steps=(STEPS,))
  before = _tree_listing(directory)
  exp = experiment_lib.build(small_config(train__steps=STEPS, **override))
  fns = step_functions.build_step_functions(exp.model, exp.optimizer, mesh_lib.create_mesh(exp.mesh),
                                            exp.mesh.strategy)
  m = _manager(directory)
  with pytest.raises(resume.ResumeRefused) as info:
    resume.restore_or_init(exp, fns, m)
  m.close()
  _assert_refusal(str(info.value), field, fits)
  assert _tree_listing(directory) == before  # every checkpoint still in place
  assert not os.path.exists(tmp_path / "checkpoints_corrupt")


@pytest.mark.slow
def test_a_changed_config_stops_the_trainer_with_one_line_and_exit_2(finished, tmp_path, env):
  (override, field, fits), = [c for c in CHANGES if "model__width" in c[0]]
  workdir = tmp_path / "wd"
  shutil.copytree(finished, workdir)
  before = _tree_listing(workdir / "checkpoints")
  rc, out = _finish(_start(workdir, env, **override), timeout=300)
  assert rc == 2, out[-4000:]
  error = [line for line in out.splitlines() if line.startswith("error: ")]
  assert len(error) == 1, out[-4000:]
  _assert_refusal(error[0], field, fits)
  assert "resuming" not in out.lower() and f"newest checkpoint step {STEPS} of {STEPS}" in out
  assert "Traceback" not in out
  assert _tree_listing(workdir / "checkpoints") == before  # every checkpoint still in place
  assert not os.path.exists(workdir / "checkpoints_corrupt")


def test_refusal_hints_follow_the_arrays():
  base = small_config()
  saved_exp = experiment_lib.build(base)
  specs = lambda params, state: {**{f"params/{k}": v for k, v in params.items()},
                                 **{f"state/{k}": v for k, v in state.items()}}
  saved_arrays = specs({"w": [[64, 64], "float32"]}, {"mu/w": [[64, 64], "float32"]})
  meta = {"step": 12, "config": saved_exp.to_json(), "arrays": saved_arrays}
  lr = experiment_lib.build(small_config(optimizer__learning_rate=1e-3)).to_json()
  cases = {  # requested arrays -> (init_from offered, accept offered)
      "same arrays": (saved_arrays, True, True),
      "other optimizer state": (specs({"w": [[64, 64], "float32"]}, {}), True, False),
      "other parameters": (specs({"w": [[64, 128], "float32"]}, {"mu/w": [[64, 128], "float32"]}),
                           False, False),
  }
  for name, (requested, init_from, accept) in cases.items():
    with pytest.raises(resume.ResumeRefused) as info:
      resume.check_resumable(meta, lr, "/wd/checkpoints", requested_arrays=requested)
    text = str(info.value)
    assert "optimizer.learning_rate: 0.003 -> 0.001" in text and "another --workdir" in text, name
    assert ("--init_from=/wd/checkpoints" in text) == init_from, (name, text)
    assert ("--accept_config_changes=optimizer.learning_rate" in text) == accept, (name, text)
  resume.check_resumable(meta, lr, "/wd", accept=["optimizer.learning_rate"],
                         requested_arrays=saved_arrays)  # accepted: no refusal


def test_compatible_fields_are_not_compared():
  saved = json.loads(experiment_lib.build(small_config()).to_json())
  changed = json.loads(experiment_lib.build(small_config(
      train__steps=99, mesh__fsdp=4, mesh__data=2, checkpoint__keep_last=7, model__remat="block",
      optimizer__learning_rate=1e-3)).to_json())
  assert resume.compare(saved, changed) == (["optimizer.learning_rate: 0.003 -> 0.001"], [])
  assert resume.compare(saved, changed, accept=["optimizer.learning_rate"]) == ([], [])
  assert resume.compare(saved, changed, accept=["optimizer.*"]) == ([], [])


# ---------------------------------------------------------------------------- exit codes


def test_sigterm_before_the_loop_exits_42_without_saving(tmp_path, env):
  # Hold the job in its start-up phase (fault-injection hook of heartbeat.py), then SIGTERM it.
  proc = _start(tmp_path, dict(env, RECURRENTGEMMA_TPU_PHASE_DELAY="starting=60"))
  wait_for(lambda: (heartbeat.read(str(tmp_path)) or {}).get("phase") == "starting", proc, 300,
           "the starting heartbeat")
  proc.send_signal(signal.SIGTERM)
  rc, out = _finish(proc, timeout=120)
  assert rc == 42, out[-4000:]
  assert "preempted: SIGTERM received outside the training loop; nothing was saved." in out
  assert not glob.glob(str(tmp_path / "checkpoints" / "*"))


@pytest.mark.parametrize("case", ["workdir_is_a_file", "config_syntax_error", "learning_rate_inf"])
def test_user_errors_exit_2_with_one_line(tmp_path, env, case):
  workdir, extra, overrides = tmp_path / "wd", [], {}
  if case == "workdir_is_a_file":
    workdir.write_text("not a directory")
    want = f"error: --workdir={workdir} is a file"
  elif case == "config_syntax_error":
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    extra = [f"--config={bad}"]
    want = f"error: --config={bad} could not be loaded: SyntaxError"
  else:
    overrides = {"optimizer__learning_rate": "inf"}
    want = "error: config.optimizer.learning_rate=inf must be a finite number."
  cmd = train_command(str(workdir), **{"train__steps": STEPS, **overrides})
  if extra:  # replace the config file, drop the overrides that belong to tiny.py's fields
    cmd = cmd[:3] + extra + [f"--workdir={workdir}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-4000:]
  assert want in proc.stderr, proc.stderr[-4000:]
  assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- kill storm


def _tmp_saves(workdir):
  return glob.glob(str(workdir / "checkpoints" / "*.orbax-checkpoint-tmp*"))


@pytest.mark.slow
def test_kill_storm_resumes_bitwise_and_evaluates_once(finished, tmp_path, env):
  """SIGKILL at start-up, mid-save (a checkpoint every step, written asynchronously) and during the
  final evaluation; restarted until done: the same parameters, loss curve and final evaluation as
  the uninterrupted run, with one evaluation record."""
  rng = random.Random(14)
  slow_eval = dict(env, RECURRENTGEMMA_TPU_PHASE_DELAY="evaluating=30")
  # 1. During start-up (imports, data preparation, restore or compile).
  proc = _start(tmp_path, env, checkpoint__save_every=1)
  time.sleep(rng.uniform(1.0, 4.0))
  proc.kill()
  proc.wait()
  # 2. While training, at random steps, until at least one kill lands while a save is in flight.
  kills, mid_save = 0, 0
  targets = iter(sorted(rng.sample(range(2, STEPS - 1), 4)))
  while kills < 2 or (mid_save == 0 and kills < 4):
    target = next(targets)
    proc = _start(tmp_path, env, checkpoint__save_every=1)
    wait_for(lambda: _logged_step(tmp_path) >= target, proc, 600, f"step {target}")
    time.sleep(rng.uniform(0.0, 0.2))
    proc.kill()
    proc.wait()
    kills += 1
    mid_save += bool(_tmp_saves(tmp_path))
  assert mid_save >= 1, "no kill landed during an asynchronous save"
  # 3. During the final evaluation (the last checkpoint is committed, the record not yet written).
  proc = _start(tmp_path, slow_eval, checkpoint__save_every=1)
  wait_for(lambda: (heartbeat.read(str(tmp_path)) or {}).get("phase") == "evaluating", proc, 600,
           "the final evaluation")
  proc.kill()
  proc.wait()
  assert not metrics_lib.read_metrics(str(tmp_path), "eval")
  m = ckpt.CheckpointManager(tmp_path / "checkpoints", ckpt.CheckpointOptions(1, 100, 0, False))
  assert m.latest_step() == STEPS
  m.close()
  # 4. The restart only evaluates; a further one finds the run complete and changes nothing.
  rc, out = _finish(_start(tmp_path, env, checkpoint__save_every=1))
  assert rc == 0 and f"Training completed at step {STEPS}" in out, out[-4000:]
  rc, out = _finish(_start(tmp_path, env, checkpoint__save_every=1))
  assert rc == 0 and f"Training already complete at step {STEPS}" in out, out[-4000:]
  got_eval = metrics_lib.read_metrics(str(tmp_path), "eval")
  assert got_eval == metrics_lib.read_metrics(str(finished), "eval") and len(got_eval) == 1
  assert (heartbeat.read(str(tmp_path)) or {}).get("phase") == "done"
  losses = lambda w: [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(str(w))]
  assert losses(tmp_path) == losses(finished)
  jax.tree.map(np.testing.assert_array_equal, _params(tmp_path), _params(finished))


# ---------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def targets():
  """Restore targets (params, state item) of the run on this process's 8 devices; nothing compiles."""
  exp = experiment_lib.build(small_config(train__steps=STEPS))
  fns = step_functions.build_step_functions(exp.model, exp.optimizer, mesh_lib.create_mesh(exp.mesh),
                                            exp.mesh.strategy)
  return resume.abstract_checkpoint(fns)


@pytest.fixture(scope="module")
def intact(finished, targets):
  """step -> (params, state item) of the undamaged run, each restored once per module."""
  cache = {}

  def get(step):
    if step not in cache:
      cache[step] = _checkpoint(finished, targets, step)
    return cache[step]

  return get


def _copy_checkpoints(finished, tmp_path, steps=None):
  """A copy of the run's checkpoint directory (of `steps` only, if given)."""
  for step in steps or os.listdir(finished / "checkpoints"):
    shutil.copytree(finished / "checkpoints" / str(step), tmp_path / "checkpoints" / str(step))
  return tmp_path / "checkpoints"


def _manager(directory):
  return ckpt.CheckpointManager(directory, ckpt.CheckpointOptions(2, 100, 0, False),
                                retry_pause_s=0.01)


def _expected_error(directory, step, kind):
  """(where, what) the one-line report of `kind` damage to `step` names: the file (or the item
  holding a data file) and the error that damage causes, whatever the file's layout."""
  item, what = kind.split("_", 1)
  step_dir = directory / str(step)
  return {
      "data_truncated": (step_dir / item, "OUT_OF_RANGE: "),  # its chunks lie past the new end
      "data_deleted": (step_dir / item, "Error reading "),
      "data_altered": (step_dir / item, f"checksum mismatch in array {item}/"),
      "metadata_garbage": (step_dir / (f"{item}/_METADATA" if item != "meta" else "meta/metadata"),
                           "UnicodeDecodeError: "),
      "metadata_emptied": (step_dir / (f"{item}/_METADATA" if item != "meta" else "meta/metadata"),
                           "JSONDecodeError: "),
      "manifest_emptied": (step_dir / "params", "manifest.ocdbt\": Error decoding manifest"),
  }[what]


@pytest.mark.slow
@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_each_damage_to_the_newest_step_falls_back_to_the_previous_one(finished, targets, intact,
                                                                       tmp_path, caplog, kind):
  """The resume policy on the real run's checkpoints, in this process (the trainer around it is the
  next test's): step 12 damaged one way restores step 10, equal to the undamaged step 10, with one
  warning line naming step 12, the file and that damage's error; step 12 is set aside as it was.
  A step that is still intact is simply kept."""
  directory = _copy_checkpoints(finished, tmp_path, steps=(STEPS - 2, STEPS))
  damage(directory / str(STEPS), kind)
  damaged = _tree_listing(directory / str(STEPS))
  m = _manager(directory)
  with caplog.at_level(logging.WARNING):
    restored = resume.restore_newest(m, *targets)
  m.close()
  # The policy's lines (absl); asyncio may also log, late, a chunk read the failed restore abandoned.
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and r.name == "absl"]
  if kind in HARMLESS:
    assert restored.step == STEPS and not warnings, warnings
    assert not os.path.exists(tmp_path / "checkpoints_corrupt")
  else:
    assert restored.step == STEPS - 2
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    where, what = _expected_error(directory, STEPS, kind)
    assert warnings[0].startswith(f"Checkpoint step {STEPS} is damaged: {where}: "), warnings[0]
    assert what in warnings[0] and "continuing from step 10" in warnings[0], warnings[0]
    (moved,) = os.listdir(tmp_path / "checkpoints_corrupt")  # set aside as it was, not deleted
    assert moved.startswith(f"{STEPS}.")
    assert _tree_listing(tmp_path / "checkpoints_corrupt" / moved) == damaged
  jax.tree.map(np.testing.assert_array_equal, jax.device_get((restored.params, restored.state)),
               intact(restored.step))


@pytest.mark.slow
def test_a_run_whose_newest_step_is_damaged_falls_back_and_ends_bitwise_equal(finished, targets,
                                                                             tmp_path, env):
  """The same command again after step 12's optimizer state was changed on disk: it falls back to
  step 10 with one warning line, sets step 12 aside, trains steps 11-12 and ends bitwise equal to
  the uninterrupted run, evaluated once."""
  workdir = tmp_path / "wd"
  shutil.copytree(finished, workdir)
  damage(workdir / "checkpoints" / str(STEPS), "state_data_altered")
  damaged = _tree_listing(workdir / "checkpoints" / str(STEPS))
  rc, out = _finish(_start(workdir, env))
  assert rc == 0 and f"Training completed at step {STEPS}" in out, out[-4000:]
  warnings = [line for line in out.splitlines() if "is damaged" in line]
  assert len(warnings) == 1, out[-4000:]
  assert (f"WARNING: Checkpoint step {STEPS} is damaged: {workdir / 'checkpoints' / str(STEPS)}/state: "
          "checksum mismatch in array state/") in warnings[0], warnings[0]
  assert "continuing from step 10" in warnings[0]
  (moved,) = os.listdir(workdir / "checkpoints_corrupt")
  assert moved.startswith(f"{STEPS}.")
  assert _tree_listing(workdir / "checkpoints_corrupt" / moved) == damaged
  assert _losses(workdir) == _losses(finished)
  got_eval = metrics_lib.read_metrics(str(workdir), "eval")
  assert got_eval == metrics_lib.read_metrics(str(finished), "eval") and len(got_eval) == 1
  jax.tree.map(np.testing.assert_array_equal, _checkpoint(workdir, targets),
               _checkpoint(finished, targets))


@pytest.mark.slow
def test_damage_to_every_step_names_each_and_moves_nothing(finished, targets, tmp_path):
  """Every step damaged, each another way: nothing restores, nothing is moved, and the one line
  names each step with its file and its own error (in this process; the trainer's exit 1 with
  that line is the next test's)."""
  directory = _copy_checkpoints(finished, tmp_path)
  kinds = [k for k in DAMAGE_KINDS if k not in HARMLESS]
  steps = sorted(int(s) for s in os.listdir(directory))
  chosen = {step: kinds[(3 * i) % len(kinds)] for i, step in enumerate(steps)}
  for step, kind in chosen.items():
    damage(directory / str(step), kind)
  before = _tree_listing(directory)
  m = _manager(directory)
  with pytest.raises(ckpt.StorageError) as info:
    resume.restore_newest(m, *targets)
  m.close()
  line = str(info.value)
  assert line.startswith(f"No checkpoint in {directory} could be read, so nothing was moved and "
                         "nothing restarts from step 0: ") and "\n" not in line, line
  # Each step's part of the line, newest first, holds its own file and error.
  starts = [line.index(f"step {step}: ") for step in reversed(steps)]
  assert starts == sorted(starts), line
  for (step, kind), begin, stop in zip(sorted(chosen.items(), reverse=True), starts,
                                       starts[1:] + [len(line)]):
    where, what = _expected_error(directory, step, kind)
    assert line[begin:stop].startswith(f"step {step}: {where}: ") and what in line[begin:stop], (
        kind, line[begin:stop])
  assert _tree_listing(directory) == before and not os.path.exists(tmp_path / "checkpoints_corrupt")


def _refused_with_nothing_moved(workdir, env):
  """Runs the same command on `workdir`; asserts exit 1 after one line, nothing moved or trained."""
  before = (_tree_listing(workdir / "checkpoints"), (workdir / "metrics.jsonl").read_text())
  rc, out = _finish(_start(workdir, env), timeout=300)
  assert rc == 1, out[-4000:]
  errors = [line for line in out.splitlines() if line.startswith("internal error: ")]
  assert len(errors) == 1 and "Traceback" not in out, out[-4000:]
  assert "nothing was moved" in errors[0] and "nothing restarts from step 0" in errors[0]
  assert "[train] step" not in out  # no restart from step 0
  assert (_tree_listing(workdir / "checkpoints"), (workdir / "metrics.jsonl").read_text()) == before
  assert not os.path.exists(workdir / "checkpoints_corrupt")
  return errors[0]


@pytest.mark.slow
def test_storage_error_on_every_read_moves_nothing(finished, tmp_path, env):
  """Every file of every step answers reads with EIO, like a failed disk or a dead network mount
  (the files are links to /proc/self/mem, whose first page no process maps): still listed, never
  readable. Root reads through chmod, so this is how a test makes reads fail for real. The trainer
  stops with exit 1 and the one line, nothing moved or trained."""
  workdir = tmp_path / "wd"
  shutil.copytree(finished, workdir)
  for root, _, files in os.walk(workdir / "checkpoints"):
    for name in files:
      os.remove(os.path.join(root, name))
      os.symlink("/proc/self/mem", os.path.join(root, name))
  line = _refused_with_nothing_moved(workdir, env)
  for step in os.listdir(workdir / "checkpoints"):  # each step, the file and the storage error
    path = workdir / "checkpoints" / step / "_CHECKPOINT_METADATA"
    assert f"step {step}: {path}: OSError: [Errno 5] Input/output error" in line, line



@pytest.mark.slow
def test_two_hosts_agree_on_a_damaged_newest_step(finished, tmp_path):
  """Two processes (one CPU device each, gloo) act as two hosts, each reading only its own shards:
  one chunk of the newest step is damaged, which only one host reads. While that host's read fails,
  the other's succeeds and would verify its checksums, a computation across hosts; every decision
  must still be taken together (fall back, set step 12 aside once, train on) instead of the two
  running different collectives, which aborts or hangs them."""
  workdir = tmp_path / "wd"
  shutil.copytree(finished, workdir)
  # The last of 8 chunks along the width, which the 2-way fsdp mesh gives to one host only.
  garble_chunk(workdir / "checkpoints" / str(STEPS), "params", "groups.block_0.mlp_block.ffw_up_w/0.0.7.0")
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      train_command(str(workdir), f"--coordinator_address=localhost:{port}", "--num_processes=2",
                    f"--process_id={i}", train__steps=STEPS, checkpoint__save_every=2),
      cwd=REPO, env=subprocess_env(num_devices=1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, readable_tail(out)
  # The damage was one host's alone: the other read its shards and was told of the failure.
  told = ["(params) failed (read 1 of at most 4; again in 1.0 s): the read failed on another process"
          in out for out in outs]
  assert sum(told) == 1, told
  warnings = [line for line in outs[0].splitlines() if "is damaged" in line]
  assert len(warnings) == 1 and "continuing from step 10" in warnings[0], outs[0][-4000:]
  assert len(os.listdir(workdir / "checkpoints_corrupt")) == 1
  got, want = _losses(workdir), _losses(finished)
  assert got[:10] == want[:10] and [s for s, _ in got] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l for _, l in got[10:]], [l for _, l in want[10:]], rtol=1e-4)
