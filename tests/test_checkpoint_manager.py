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
from recurrentgemma_tpu.checkpoints import resume as resume_lib
from sharding import mesh as mesh_lib
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
  r = m.restore_latest(_abstract(p), _abstract(st))
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
  r = m.restore_latest(_abstract(p), _abstract(st))
  assert r.step == 4 and r.meta["data"] == {"next_step": 4}
  np.testing.assert_array_equal(r.params["w"], np.full((16, 4), 4.0))
  np.testing.assert_array_equal(r.state["mu"]["w"], np.full((16, 4), 8.0))
  # The resumed run reaches step 6 again: its save replaces the leftover of the killed one.
  p6, st6 = _toy_state(60.0)
  assert m.save(6, p6, st6, {})
  m.close()
  assert sorted(os.listdir(tmp_path)) == ["2", "4", "6"]
  m = ckpt.CheckpointManager(tmp_path, _options(keep_last=5))
  np.testing.assert_array_equal(m.restore_latest(_abstract(p), _abstract(st)).params["w"],
                                np.full((16, 4), 60.0))
  m.close()


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
    r = m.restore_latest(_abstract(p), _abstract(st))
  assert r.step == 2
  np.testing.assert_array_equal(r.params["w"], np.full((16, 4), 2.0))
  assert any("step 4" in rec.getMessage() and "falling back" in rec.getMessage() for rec in caplog.records)
  assert m.all_steps() == [2]
  assert os.listdir(tmp_path / "ck_corrupt")  # moved aside for inspection, not deleted
  # Training can redo step 4 under the same number.
  p4, st4 = _toy_state(4.0)
  assert m.save(4, p4, st4, {})
  m.close()


def test_no_checkpoint_means_fresh_start(tmp_path):
  m = ckpt.CheckpointManager(tmp_path, _options())
  p, st = _toy_state(0.0)
  assert m.restore_latest(_abstract(p), _abstract(st)) is None
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
  assert m.save(2, state.params, resume_lib.state_item(state), {})
  m.close()
  expected = jax.device_get((state.params, resume_lib.state_item(state)))
  for mesh_kw, n in (({"fsdp": 2, "model": 2}, 4), ({"fsdp": 1}, 1)):
    fns = _step_functions(config, devices[:n], **mesh_kw)
    m = ckpt.CheckpointManager(tmp_path, _options())
    abstract_params, abstract_rest = resume_lib.abstract_checkpoint(fns)
    r = m.restore_latest(abstract_params, abstract_rest)
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
  return params, {"step": jnp.asarray(seed, jnp.int32)}


def _write_random_steps(directory, steps):
  m = ckpt.CheckpointManager(directory, _options(keep_last=5), retry_pause_s=0.01)
  for s in steps:
    assert m.save(s, *_random_state(s), {"data": {"next_step": s}})
  m.close()


def _data_files(step_dir):
  return [os.path.join(root, f) for root, _, files in os.walk(step_dir)
          if os.path.basename(root) == "d" for f in files]


def test_bit_flipped_array_is_detected_and_the_previous_step_used(tmp_path, caplog):
  _write_random_steps(tmp_path / "ck", [2, 4])
  # Invert 64 bytes in the middle of step 4's largest parameter data file; its size is unchanged.
  path = max(_data_files(tmp_path / "ck" / "4" / "params"), key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  size = len(data)
  for i in range(size // 2, size // 2 + 64):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))
  assert os.path.getsize(path) == size
  p, st = _random_state(0)
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5), retry_pause_s=0.01)
  with caplog.at_level(logging.WARNING):
    r = m.restore_latest(_abstract(p), _abstract(st))
  m.close()
  assert r.step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(r.params), jax.device_get(_random_state(2)[0]))
  warnings = [rec.getMessage() for rec in caplog.records if "falling back" in rec.getMessage()]
  assert warnings and "step 4" in warnings[0] and "checksum mismatch in array params/w" in warnings[0]
  assert [e.split(".")[0] for e in os.listdir(tmp_path / "ck_corrupt")] == ["4"]


@pytest.mark.parametrize("damage", ["empty_ocdbt_manifest", "garbage_checkpoint_metadata"])
def test_damaged_metadata_of_a_finished_step_is_detected(tmp_path, damage):
  _write_random_steps(tmp_path / "ck", [2, 4])
  target = {"empty_ocdbt_manifest": tmp_path / "ck" / "4" / "params" / "manifest.ocdbt",
            "garbage_checkpoint_metadata": tmp_path / "ck" / "4" / "_CHECKPOINT_METADATA"}[damage]
  assert target.exists()
  target.write_bytes(b"" if damage == "empty_ocdbt_manifest" else b"\x00\x17garbage{")
  p, st = _random_state(0)
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5), retry_pause_s=0.01)
  r = m.restore_latest(_abstract(p), _abstract(st))
  m.close()
  assert r.step == 2 and m.all_steps() == [2]
  assert os.listdir(tmp_path / "ck_corrupt")


def test_transient_read_error_is_retried_and_nothing_is_quarantined(tmp_path, monkeypatch, caplog):
  _write_random_steps(tmp_path / "ck", [2, 4])
  real = ckpt.ocp.CheckpointManager.restore
  failures = []

  def flaky(self, step, *args, **kwargs):
    items = set(kwargs["args"].keys()) if "args" in kwargs else set()
    if "params" in items and not failures:  # the first array read fails like a storage hiccup
      failures.append(step)
      raise ValueError("UNAVAILABLE: Error reading params/d/...: connection reset by peer")
    return real(self, step, *args, **kwargs)

  monkeypatch.setattr(ckpt.ocp.CheckpointManager, "restore", flaky)
  p, st = _random_state(0)
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5), retry_pause_s=0.01)
  with caplog.at_level(logging.WARNING):
    r = m.restore_latest(_abstract(p), _abstract(st))
  m.close()
  assert failures == [4] and r.step == 4
  assert any("retrying" in rec.getMessage() for rec in caplog.records)
  assert m.all_steps() == [2, 4] and not os.path.exists(tmp_path / "ck_corrupt")


def test_persistent_non_damage_error_moves_nothing(tmp_path, monkeypatch):
  _write_random_steps(tmp_path / "ck", [2, 4])

  def down(self, step, *args, **kwargs):
    raise ValueError("UNAVAILABLE: storage is down")

  monkeypatch.setattr(ckpt.ocp.CheckpointManager, "restore", down)
  p, st = _random_state(0)
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5), read_attempts=2,
                             retry_pause_s=0.01)
  with pytest.raises(ckpt.StorageError, match=r"step 4 \(meta\).*failed 2 times.*Nothing was moved"):
    m.restore_latest(_abstract(p), _abstract(st))
  m.close()
  assert sorted(os.listdir(tmp_path / "ck")) == ["2", "4"]


def test_other_shapes_are_a_mismatch_not_damage(tmp_path):
  _write_random_steps(tmp_path / "ck", [2])
  p, st = _random_state(0)
  wider = dict(_abstract(p), w=jax.ShapeDtypeStruct((64, 128), jnp.float32))
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5), retry_pause_s=0.01)
  with pytest.raises(ckpt.CheckpointMismatch, match=r"params/w: saved \(64, 64\) float32, requested "
                     r"\(64, 128\) float32"):
    m.restore_latest(wider, _abstract(st))
  m.close()
  assert os.listdir(tmp_path / "ck") == ["2"] and not os.path.exists(tmp_path / "ck_corrupt")


def test_every_step_damaged_is_refused_not_restarted(tmp_path):
  _write_random_steps(tmp_path / "ck", [2])
  (tmp_path / "ck" / "2" / "_CHECKPOINT_METADATA").write_text("not json")
  p, st = _random_state(0)
  m = ckpt.CheckpointManager(tmp_path / "ck", _options(keep_last=5), retry_pause_s=0.01)
  with pytest.raises(ckpt.CheckpointDamaged, match="every checkpoint .* is damaged"):
    m.restore_latest(_abstract(p), _abstract(st))
  m.close()


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
  r = m.restore_latest(_abstract(p), _abstract(st))
  assert r.step == 2
  m.close()
