"""Orbax training checkpoints: retention, interrupted and corrupt saves, resharded restore, init_from."""

import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from recurrentgemma_tpu import experiment as experiment_lib
from recurrentgemma_tpu import step_functions
from recurrentgemma_tpu.checkpoints import manager as ckpt
from recurrentgemma_tpu.checkpoints import resume
from sharding import mesh as mesh_lib
from checkpoint_damage import DAMAGE_KINDS, GARBAGE, HARMLESS, damage
from test_train_common import small_config


def _options(**kw):
  return ckpt.CheckpointOptions(**{"save_every": 2, "keep_last": 2, "keep_every": 0,
                                   "async_save": True, **kw})


def _toy_state(value: float):
  """A sharded 'params' tree and a 'state' tree, all filled from `value`."""
  mesh = jax.make_mesh((8,), ("x",))
  sh = NamedSharding(mesh, PartitionSpec("x"))
  params = {"w": jax.device_put(jnp.full((16, 4), value, jnp.float32), sh),
            "b": jnp.full((3,), -value, jnp.float32)}
  state = {"step": jnp.asarray(int(value), jnp.int32), "mu": {"w": jnp.full((16, 4), 2 * value)}}
  return params, state


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _save_steps(m, steps):
  for s in steps:
    p, st = _toy_state(float(s))
    assert m.save(s, p, st, {"data": {"next_step": s}})
  m.wait_until_finished()


def test_keep_last_plus_keep_every(tmp_path):
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=2, keep_every=4))
  _save_steps(m, [s for s in range(1, 13) if m.is_periodic_step(s)])
  # Newest two (10, 12) plus every multiple of 4 (4, 8, 12).
  assert m.all_steps() == [4, 8, 10, 12]
  assert sorted(os.listdir(tmp_path / "ck")) == ["10", "12", "4", "8"]
  m.close()


def test_saving_an_existing_step_is_refused(tmp_path):
  m = ckpt.CheckpointManager(tmp_path, _options())
  _save_steps(m, [2])
  p, st = _toy_state(99.0)
  assert not m.save(2, p, st, {})
  r = resume.restore_newest(m, _abstract(p), _abstract(st))
  np.testing.assert_array_equal(r.params["w"], np.full((16, 4), 2.0))
  m.close()


def test_interrupted_save_is_never_used(tmp_path):
  m = ckpt.CheckpointManager(tmp_path, _options(keep_last=5))
  _save_steps(m, [2, 4, 6])
  m.close()
  # A save killed midway leaves the step under Orbax's temporary name (renamed only on commit).
  os.rename(tmp_path / "6", tmp_path / "6.orbax-checkpoint-tmp-1795320000")
  p, st = _toy_state(0.0)
  m = ckpt.CheckpointManager(tmp_path, _options(keep_last=5))
  assert m.latest_step() == 4
  r = resume.restore_newest(m, _abstract(p), _abstract(st))
  assert r.step == 4 and r.meta["data"] == {"next_step": 4}
  np.testing.assert_array_equal(r.params["w"], np.full((16, 4), 4.0))
  np.testing.assert_array_equal(r.state["mu"]["w"], np.full((16, 4), 8.0))
  # The resumed run reaches step 6 again: its save replaces the leftover of the killed one.
  p6, st6 = _toy_state(60.0)
  assert m.save(6, p6, st6, {})
  m.close()
  assert sorted(os.listdir(tmp_path)) == ["2", "4", "6"]
  m = ckpt.CheckpointManager(tmp_path, _options(keep_last=5))
  np.testing.assert_array_equal(resume.restore_newest(m, _abstract(p), _abstract(st)).params["w"],
                                np.full((16, 4), 60.0))
  m.close()


def test_close_waits_for_orbax_s_cleanup_of_interrupted_saves(tmp_path, monkeypatch):
  """A run that ends without saving (refused at start-up) closes its manager at once: close must
  still wait for Orbax's background removal of an interrupted save's leftovers (slowed here), which
  would otherwise fail at interpreter shutdown and print a traceback after the run's error line."""
  import asyncio  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import temporary_paths  # pylint: disable=g-import-not-at-top

  real = temporary_paths.cleanup_temporary_paths

  async def slow_cleanup(*args, **kwargs):
    await asyncio.sleep(1.0)
    return await real(*args, **kwargs)

  monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow_cleanup)
  leftover = tmp_path / "6.orbax-checkpoint-tmp-1795320000"
  leftover.mkdir()
  ckpt.CheckpointManager(tmp_path, _options(keep_last=5)).close()
  assert not leftover.exists()


def test_corrupt_latest_falls_back_to_previous_with_warning(tmp_path, caplog):
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5))
  _save_steps(m, [2, 4])
  m.close()
  # Committed but unreadable: the array data of step 4 is gone (e.g. a truncated copy).
  for root, dirs, _ in os.walk(tmp_path / "ck" / "4" / "params"):
    for d in dirs:
      if d == "d" or d.startswith("ocdbt"):
        shutil.rmtree(os.path.join(root, d))
  p, st = _toy_state(0.0)
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5))
  with caplog.at_level(logging.WARNING):
    r = resume.restore_newest(m, _abstract(p), _abstract(st))
  assert r.step == 2
  np.testing.assert_array_equal(r.params["w"], np.full((16, 4), 2.0))
  assert any(rec.getMessage().startswith("Checkpoint step 4 is damaged")
             and "continuing from step 2" in rec.getMessage() for rec in caplog.records)
  assert m.all_steps() == [2]
  assert os.listdir(tmp_path / "ck_corrupt")  # moved aside for inspection, not deleted
  # Training can redo step 4 under the same number.
  p4, st4 = _toy_state(4.0)
  assert m.save(4, p4, st4, {})
  m.close()


def test_no_checkpoint_means_fresh_start(tmp_path):
  m = ckpt.CheckpointManager(tmp_path, _options())
  p, st = _toy_state(0.0)
  assert resume.restore_newest(m, _abstract(p), _abstract(st)) is None
  m.close()


@pytest.mark.parametrize("kw, match", [
    ({"save_every": -1}, "save_every"),
    ({"keep_last": 0}, "keep_last"),
    ({"save_every": 3, "keep_every": 4}, "multiple of"),
])
def test_options_are_validated(kw, match):
  with pytest.raises(ValueError, match=match):
    _options(**kw)


def _step_functions(config, devices, **mesh):
  cfg = mesh_lib.MeshConfig(strategy="griffin", **mesh)
  plan = experiment_lib.build(config, num_devices=len(devices))
  return step_functions.build_step_functions(plan.model, plan.optimizer,
                                             mesh_lib.create_mesh(cfg, devices), "griffin")


def test_restore_onto_other_meshes_and_device_counts(tmp_path):
  """A real train state saved on 8 devices (fsdp=8) restores on 2x2 (fsdp x model: another device
  count, a re-split fsdp axis and tensor-parallel layouts at once) and on 1 device (unsharded)."""
  config = small_config()
  devices = jax.devices()
  fns8 = _step_functions(config, devices, fsdp=8)
  state = fns8.create_state(jax.random.key(3))
  m = ckpt.CheckpointManager(tmp_path, _options())
  assert m.save(2, state.params, resume.state_item(state), {})
  m.close()
  expected = jax.device_get((state.params, resume.state_item(state)))
  for mesh_kw, n in (({"fsdp": 2, "model": 2}, 4), ({"fsdp": 1}, 1)):
    fns = _step_functions(config, devices[:n], **mesh_kw)
    m = ckpt.CheckpointManager(tmp_path, _options())
    abstract_params, abstract_rest = resume.abstract_checkpoint(fns)
    r = resume.restore_newest(m, abstract_params, abstract_rest)
    m.close()
    got = jax.device_get((r.params, r.state))
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    for leaf, sharding in zip(jax.tree.leaves(r.params), jax.tree.leaves(fns.state_shardings.params)):
      assert leaf.sharding == sharding
      assert len(leaf.sharding.device_set) == n


def test_load_params_from_each_accepted_location(tmp_path):
  p, st = _toy_state(6.0)
  m = ckpt.CheckpointManager(tmp_path / "wd" / "checkpoints", _options())
  _save_steps(m, [2, 6])
  m.close()
  ckpt.save_params(tmp_path / "plain", p)
  target = _abstract(p)
  for where, value in ((tmp_path / "wd", 6.0), (tmp_path / "wd" / "checkpoints", 6.0),
                       (tmp_path / "wd" / "checkpoints" / "2", 2.0), (tmp_path / "plain", 6.0)):
    got = ckpt.load_params(where, target)
    np.testing.assert_array_equal(got["w"], np.full((16, 4), value))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ckpt.load_params(tmp_path / "missing", target)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="neither a parameters checkpoint"):
    ckpt.load_params(tmp_path / "empty", target)
  wrong = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32), "b": target["b"]}
  with pytest.raises(ValueError, match="do not match"):
    ckpt.load_params(tmp_path / "plain", wrong)


# ---------------------------------------------------------------------------- integrity and damage


def _random_state(seed: int):
  """Incompressible arrays, so a flipped byte on disk changes values instead of breaking zstd."""
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.standard_normal((64, 64), np.float32)),
            "b": jnp.asarray(rng.standard_normal((64,), np.float32))}
  return params, {"step": jnp.asarray(seed, jnp.int32),
                  "mu": jnp.asarray(rng.standard_normal((64, 64), np.float32))}


def _write_random_steps(directory, steps):
  m = ckpt.CheckpointManager(directory, _options(keep_last=5), retry_pause_s=0.01)
  for s in steps:
    assert m.save(s, *_random_state(s), {"data": {"next_step": s}})
  m.close()


def _before_each_read(monkeypatch, hook):
  """Calls `hook(step, item)` before every read of one item of one step (the item directory is
  `<checkpoints>/<step>/<item>`); what it raises is what that read raises."""
  real = ckpt._read_alone  # pylint: disable=protected-access

  def read(handler_type, item_dir, args):
    hook(int(os.path.basename(os.path.dirname(item_dir))), os.path.basename(item_dir))
    return real(handler_type, item_dir, args)

  monkeypatch.setattr(ckpt, "_read_alone", read)


@pytest.fixture
def count_reads(monkeypatch):
  """{(step, item): number of times that item was read} for every restore."""
  reads = {}

  def count(step, item):
    reads[(step, item)] = reads.get((step, item), 0) + 1

  _before_each_read(monkeypatch, count)
  return reads


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_damaged_newest_step_falls_back_after_at_most_one_extra_read(tmp_path, caplog, count_reads,
                                                                    kind):
  _write_random_steps(tmp_path / "ck", [2, 4])
  path = damage(tmp_path / "ck" / "4", kind)
  item = kind.split("_")[0] if not kind.startswith(("ocdbt", "commit")) else "params"
  p, st = _random_state(0)
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5), retry_pause_s=0.01)
  with caplog.at_level(logging.WARNING):
    r = resume.restore_newest(m, _abstract(p), _abstract(st))
  m.close()
  want = 4 if kind in HARMLESS else 2
  assert r.step == want
  jax.tree.map(np.testing.assert_array_equal, jax.device_get((r.params, r.state)),
               jax.device_get(_random_state(want)))
  warnings = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
  if kind in HARMLESS:
    assert not warnings and m.all_steps() == [2, 4] and not os.path.exists(tmp_path / "ck_corrupt")
    return
  # One warning line naming the step, the file (or the item holding it) and the error.
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  shown = path if "_metadata_" in kind or kind.startswith("ocdbt") else os.path.dirname(
      os.path.dirname(os.path.dirname(path)))  # the item directory of a data file
  assert warnings[0].startswith("Checkpoint step 4 is damaged: ") and shown in warnings[0], warnings
  assert ("checksum mismatch in array " if kind.endswith("altered") else "Error") in warnings[0]
  # Time: the failing item is read at most twice, every other item of step 4 at most once.
  assert count_reads[(4, item)] == (1 if kind.endswith("altered") else 2), count_reads
  assert all(n <= 1 for (step, it), n in count_reads.items() if step == 4 and it != item)
  # Set aside, not deleted: the damaged file is in the quarantined copy.
  assert m.all_steps() == [2]
  (moved,) = os.listdir(tmp_path / "ck_corrupt")
  assert moved.startswith("4.")
  relative = os.path.relpath(path, tmp_path / "ck" / "4")
  assert os.path.exists(os.path.join(tmp_path, "ck_corrupt", moved, relative)) != kind.endswith("deleted")


def test_garbled_checkpoint_metadata_is_damage(tmp_path):
  _write_random_steps(tmp_path / "ck", [2, 4])
  (tmp_path / "ck" / "4" / "_CHECKPOINT_METADATA").write_bytes(GARBAGE)
  p, st = _random_state(0)
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5), retry_pause_s=0.01)
  r = resume.restore_newest(m, _abstract(p), _abstract(st))
  m.close()
  assert r.step == 2 and m.all_steps() == [2]
  assert os.listdir(tmp_path / "ck_corrupt")


def test_transient_read_error_is_retried_and_nothing_is_quarantined(tmp_path, monkeypatch, caplog):
  _write_random_steps(tmp_path / "ck", [2, 4])
  failures = []

  def flaky(step, item):
    if item == "params" and not failures:  # the first array read: a storage hiccup
      failures.append(step)
      raise ValueError("UNAVAILABLE: Error reading params/d/...: connection reset by peer")

  _before_each_read(monkeypatch, flaky)
  p, st = _random_state(0)
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5), retry_pause_s=0.01)
  with caplog.at_level(logging.INFO):
    r = resume.restore_newest(m, _abstract(p), _abstract(st))
  m.close()
  assert failures == [4] and r.step == 4
  assert any("again in" in rec.getMessage() for rec in caplog.records)
  assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
  assert m.all_steps() == [2, 4] and not os.path.exists(tmp_path / "ck_corrupt")


def test_storage_down_moves_nothing_and_names_every_step(tmp_path, monkeypatch, count_reads):
  _write_random_steps(tmp_path / "ck", [2, 4])

  def down(step, item):
    raise ValueError("UNAVAILABLE: storage is down")

  _before_each_read(monkeypatch, down)
  p, st = _random_state(0)
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5), retry_pause_s=0.01)
  with pytest.raises(ckpt.StorageError) as info:
    resume.restore_newest(m, _abstract(p), _abstract(st))
  m.close()
  text = str(info.value)
  assert "nothing was moved" in text and "\n" not in text
  assert text.count("UNAVAILABLE: storage is down") == 2 and "step 4: " in text and "step 2: " in text
  assert sorted(os.listdir(tmp_path / "ck")) == ["2", "4"] and not os.path.exists(tmp_path / "ck_corrupt")


def test_storage_failing_differently_each_time_judges_nothing(tmp_path, monkeypatch):
  _write_random_steps(tmp_path / "ck", [2, 4])
  calls = []

  def flaky(step, item):
    calls.append(step)
    raise ValueError(["UNAVAILABLE: connection reset", "DEADLINE_EXCEEDED: timed out",
                      "PERMISSION_DENIED: token expired"][len(calls) % 3])

  _before_each_read(monkeypatch, flaky)
  p, st = _random_state(0)
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5), read_attempts=3,
                             retry_pause_s=0.01)
  with pytest.raises(ckpt.StorageError, match=r"step 4 .*failed 3 times, differently each time"):
    resume.restore_newest(m, _abstract(p), _abstract(st))
  m.close()
  assert calls == [4, 4, 4]  # the older step is not read: nothing can be judged
  assert sorted(os.listdir(tmp_path / "ck")) == ["2", "4"] and not os.path.exists(tmp_path / "ck_corrupt")


def test_other_shapes_are_a_mismatch_not_damage(tmp_path):
  _write_random_steps(tmp_path / "ck", [2])
  p, st = _random_state(0)
  wider = dict(_abstract(p), w=jax.ShapeDtypeStruct((64, 128), jnp.float32))
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5), retry_pause_s=0.01)
  with pytest.raises(ckpt.CheckpointMismatch, match=r"params/w: saved \(64, 64\) float32, requested "
                     r"\(64, 128\) float32") as info:
    resume.restore_newest(m, wider, _abstract(st))
  m.close()
  assert not info.value.params_fit
  assert os.listdir(tmp_path / "ck") == ["2"] and not os.path.exists(tmp_path / "ck_corrupt")


def test_every_step_damaged_moves_nothing_and_names_each(tmp_path):
  _write_random_steps(tmp_path / "ck", [2, 4])
  damage(tmp_path / "ck" / "4", "params_data_truncated")
  damage(tmp_path / "ck" / "2", "meta_metadata_garbage")
  before = sorted(os.listdir(tmp_path / "ck"))
  p, st = _random_state(0)
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5), retry_pause_s=0.01)
  with pytest.raises(ckpt.StorageError) as info:
    resume.restore_newest(m, _abstract(p), _abstract(st))
  m.close()
  text = str(info.value)
  assert f"step 4: {tmp_path / 'ck' / '4' / 'params'}: ValueError: OUT_OF_RANGE" in text, text
  assert f"step 2: {tmp_path / 'ck' / '2' / 'meta' / 'metadata'}: UnicodeDecodeError" in text, text
  assert sorted(os.listdir(tmp_path / "ck")) == before and not os.path.exists(tmp_path / "ck_corrupt")


@pytest.mark.slow
def test_failed_async_save_is_reported_at_the_next_check_naming_the_step(tmp_path, monkeypatch):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler  # pylint: disable=g-import-not-at-top
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5), retry_pause_s=0.01)
  _save_steps(m, [2])

  async def disk_full(self, x, directory):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
  p, st = _toy_state(4.0)
  assert m.save(4, p, st, {})
  with pytest.raises(ckpt.SaveFailed, match=r"Saving checkpoint step 4 to .* failed: .*No space left"):
    for _ in range(500):  # the trainer calls check_save() at every step boundary
      m.check_save()
      time.sleep(0.01)
  monkeypatch.undo()
  assert m.all_steps() == [2]  # the earlier step is intact
  m.close()
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5))
  r = resume.restore_newest(m, _abstract(p), _abstract(st))
  assert r.step == 2
  m.close()


def test_the_same_failure_is_recognised_whichever_chunk_reports_it():
  """Two reads of one damaged file report different chunks first (other array names, byte ranges,
  messages longer than the one-line cut); they are the same failure. Another status is not."""
  db = "/" + "very/long/workdir/" * 12 + "checkpoints/10/params/"

  def error(array, status="DATA_LOSS"):
    return ValueError(f'{status}: Error opening "cast" driver: Error reading "{array}/.zarray" in '
                      f'OCDBT database at local file "{db}": Error decoding local file '
                      f'"{db}manifest.ocdbt": Encoded length (0) is less than minimum length (16) '
                      f'[tensorstore_spec=\'{{"driver":"zarr"}}\']')

  first, second = error("embedder.input_embedding"), error("groups.block_0.recurrent_block.linear_out_w")
  assert len(ckpt._one_line(first)) < len(str(first))  # the one-line text is cut, the signature not
  assert ckpt._signature(first) == ckpt._signature(second)
  assert ckpt._signature(first) != ckpt._signature(error("embedder.input_embedding", "UNAVAILABLE"))
