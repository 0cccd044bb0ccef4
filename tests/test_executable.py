"""Compile once (recurrentgemma_tpu/executable.py): the signature check, the file, load or compile.

Fast tests on small jitted programs over the 8 CPU devices (and one TPU topology compiled through
libtpu); the end-to-end check through the training loop is the slow test at the end.
"""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from recurrentgemma_tpu import executable
from recurrentgemma_tpu import workdir as workdir_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train_common import small_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_workdir import ram_scheme  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import

FINGERPRINT = "f" * 64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _step(w, x):
  return w - 0.1 * x.T @ jnp.tanh(x @ w), jnp.sum(x)


def _lowered(devices=None, shape=(16, 8), spec=P("x"), donate=(0,), fn=_step):
  mesh = jax.sharding.Mesh(np.asarray(devices or jax.devices()), ("x",))
  w_sharding, x_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, spec)
  jitted = jax.jit(fn, in_shardings=(w_sharding, x_sharding), donate_argnums=donate)
  lowered = jitted.lower(jax.ShapeDtypeStruct((shape[1], shape[1]), jnp.float32, sharding=w_sharding),
                         jax.ShapeDtypeStruct(shape, jnp.float32, sharding=x_sharding))
  return lowered, mesh, (w_sharding, x_sharding)


def _signature(**kw):
  lowered, mesh, _ = _lowered(**kw)
  return executable.signature(lowered, mesh, FINGERPRINT)


# ------------------------------------------------------------------------------------ the check


def test_the_same_program_on_the_same_devices_matches():
  assert executable.mismatch(_signature(), _signature()) is None


@pytest.mark.parametrize("change, field", [
    (dict(shape=(32, 8)), "program"),  # input avals
    (dict(spec=P()), "program"),  # input sharding
    (dict(donate=()), "program"),  # donation
    (dict(fn=lambda w, x: (w + x.T @ x, jnp.sum(x))), "program"),  # the computation
    (dict(devices=jax.devices()[::-1]), "device_assignment"),  # same devices, another order
    (dict(devices=jax.devices()[:4]), "topology"),
])
def test_each_thing_that_invalidates_an_executable_is_a_mismatch_named_in_one_line(change, field):
  here, other = _signature(), _signature(**change)
  assert getattr(here, field) != getattr(other, field)
  why = executable.mismatch(other, here)
  assert why and "\n" not in why and executable._WHY[field] in why


@pytest.mark.parametrize("field, value", [("jax", "0.4.0"), ("jaxlib", "0.4.0"), ("libtpu", "0.0.1"),
                                          ("fingerprint", "e" * 64),
                                          ("compiler_env", "XLA_FLAGS='--xla_x=1' LIBTPU_INIT_ARGS=''")])
def test_versions_fingerprint_and_compiler_flags_are_checked(field, value):
  here = _signature()
  shipped = dataclasses.replace(here, **{field: value})
  why = executable.mismatch(shipped, here)
  assert why.startswith(executable._WHY[field]) and why.count(";") == 0


def test_the_compiler_environment_ignores_only_the_virtual_cpu_device_count():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8  --xla_cpu_x=1"}
  assert executable.compiler_env(env) == executable.compiler_env({"XLA_FLAGS": "--xla_cpu_x=1"})
  assert executable.compiler_env(env) != executable.compiler_env({})
  assert (executable.compiler_env({"LIBTPU_INIT_ARGS": "--xla_tpu_y=true"})
          != executable.compiler_env({}))


@pytest.mark.tpu_compile
def test_an_executable_for_a_tpu_topology_is_refused_on_cpu_naming_both():
  from sharding import planner  # pylint: disable=g-import-not-at-top
  _, tpu_devices, _ = planner.topology_devices("v5p:2x2x2")
  tpu = _signature(devices=tpu_devices)
  assert tpu.libtpu and tpu.topology.startswith("tpu TPU v5")
  why = executable.mismatch(tpu, _signature())
  assert why.startswith("topology 'tpu TPU v5") and "'cpu cpu x 8, 1 process(es)' here" in why


# ------------------------------------------------------------------------------------ the file


def _compiled_file(tmp_path, **kw):
  lowered, mesh, _ = _lowered(**kw)
  path = str(tmp_path / "train_step.bin")
  executable.save(path, lowered.compile(), executable.signature(lowered, mesh, FINGERPRINT))
  return path


def _args(shardings):
  w = jax.device_put(np.eye(8, dtype=np.float32) * 0.5, shardings[0])
  x = jax.device_put(np.arange(128, dtype=np.float32).reshape(16, 8) / 100, shardings[1])
  return w, x


def test_a_matching_file_is_loaded_and_computes_what_a_fresh_compile_does(tmp_path):
  path = _compiled_file(tmp_path)
  lowered, mesh, shardings = _lowered()
  warnings = []
  fn, source = executable.load_or_compile(path, lowered, executable.signature(lowered, mesh, FINGERPRINT),
                                          warn=warnings.append)
  assert source == "shipped" and not warnings
  expected = jax.device_get(lowered.compile()(*_args(shardings)))
  w, x = _args(shardings)
  got = jax.device_get(fn(w, x))
  assert w.is_deleted()  # the loaded executable still donates the state
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_a_file_for_another_program_is_refused_with_one_warning_line_and_compiled(tmp_path):
  path = _compiled_file(tmp_path, shape=(32, 8))
  lowered, mesh, shardings = _lowered()
  warnings = []
  fn, source = executable.load_or_compile(path, lowered, executable.signature(lowered, mesh, FINGERPRINT),
                                          warn=warnings.append)
  assert source == "refused" and len(warnings) == 1 and "\n" not in warnings[0]
  assert "lowered program" in warnings[0] and path in warnings[0] and "compiling" in warnings[0]
  assert np.isfinite(jax.device_get(fn(*_args(shardings))[0])).all()


@pytest.mark.parametrize("damage", [lambda b: b[:len(b) // 2], lambda b: b"garbage" + b,
                                    lambda b: b[:40], lambda b: b.replace(b'"jax"', b'"jux"', 1)])
def test_an_unreadable_file_is_one_warning_line_and_a_compile(tmp_path, damage):
  path = _compiled_file(tmp_path)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(damage(data))
  lowered, mesh, _ = _lowered()
  warnings = []
  _, source = executable.load_or_compile(path, lowered, executable.signature(lowered, mesh, FINGERPRINT),
                                         warn=warnings.append)
  assert source == "refused" and len(warnings) == 1 and "\n" not in warnings[0]
  assert "is unreadable" in warnings[0]


# pylint: disable-next=unused-argument,redefined-outer-name
def test_a_file_in_a_remote_run_directory_is_written_and_loaded(ram_scheme):
  """The same code path as gs:// (etils.epath on the TensorFlow backend), served from memory."""
  lowered, mesh, _ = _lowered()
  here = executable.signature(lowered, mesh, FINGERPRINT)
  path = "ram://bucket/run/" + workdir_lib.EXECUTABLE_FILE
  executable.save(path, lowered.compile(), here)
  assert workdir_lib.read_bytes(path).startswith(executable.MAGIC)
  _, source = executable.load_or_compile(path, lowered, here, warn=pytest.fail)
  assert source == "shipped"


def test_no_file_compiles_without_a_warning(tmp_path):
  lowered, mesh, _ = _lowered()
  warnings = []
  _, source = executable.load_or_compile(str(tmp_path / "none"), lowered,
                                         executable.signature(lowered, mesh, FINGERPRINT),
                                         warn=warnings.append)
  assert source == "compiled" and not warnings


def test_ship_executable_copies_the_fit_checks_file_only_when_the_plan_fits(tmp_path):
  from launch import preflight  # pylint: disable=g-import-not-at-top
  src = tmp_path / "key.executable"
  src.write_bytes(b"executable bytes")
  workdir = str(tmp_path / "run")
  assert not preflight.ship_executable(preflight.FitCheck(False, "", executable=str(src)), workdir, print)
  assert not os.path.exists(workdir_lib.join(workdir, workdir_lib.EXECUTABLE_FILE))
  assert not preflight.ship_executable(preflight.FitCheck(True, ""), workdir, print)
  assert preflight.ship_executable(preflight.FitCheck(True, "", executable=str(src)), workdir, print)
  with open(workdir_lib.join(workdir, workdir_lib.EXECUTABLE_FILE), "rb") as f:
    assert f.read() == b"executable bytes"


# ------------------------------------------------------------------------------------ the training loop


def _params(exp, workdir):
  import flax  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu.checkpoints import manager as ckpt  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(lambda: flax.core.meta.unbox(model_lib.init_params(exp.model, jax.random.key(0))))
  return jax.device_get(ckpt.load_params(workdir, shapes))


def _ship(fns, exp, workdir, lowered=None):
  """Writes the train step of `exp` built with `fns` as the run's shipped executable."""
  path = workdir_lib.join(str(workdir), workdir_lib.EXECUTABLE_FILE)
  if lowered is None:
    return executable.compile_and_save(fns, exp, path)[0]
  sig = executable.signature(lowered, fns.mesh, exp.fingerprint())
  executable.save(path, lowered.compile(), sig)
  return sig


@pytest.mark.slow
@pytest.mark.tpu_compile
def test_the_loop_refuses_an_executable_for_another_topology_and_trains_bitwise_the_same(
    tmp_path, caplog):
  """Shipped: the fit check's executable of this config for a TPU topology, and this job's own. The
  first compiles after one warning line, the second loads; both end with exactly the parameters and
  evaluation of the run without a shipped file. (Another config: the fast tests above.)"""
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import step_functions  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import trainer  # pylint: disable=g-import-not-at-top
  from sharding import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from sharding import planner  # pylint: disable=g-import-not-at-top

  exp = experiment_lib.build(small_config(train__steps=1, checkpoint__save_every=1))
  build = lambda mesh: step_functions.build_step_functions(exp.model, exp.optimizer, mesh, exp.mesh.strategy)
  _, tpu_devices, _ = planner.topology_devices("v5p:2x2x2")  # 8 devices, as here: same experiment
  tpu_fns = build(mesh_lib.create_mesh(exp.mesh, tpu_devices))
  _ship(tpu_fns, exp, tmp_path / "other_topology",
        lowered=tpu_fns.lower_train_step(exp.data.global_batch_size, exp.data.seq_len))
  _ship(build(mesh_lib.create_mesh(exp.mesh)), exp, tmp_path / "this_job")

  reference = trainer.train_and_evaluate(exp, str(tmp_path / "not_shipped"))
  expected = _params(exp, tmp_path / "not_shipped")
  for name, warning in [("other_topology", "topology 'tpu TPU v5"), ("this_job", None)]:
    caplog.clear()
    with caplog.at_level("INFO"):
      result = trainer.train_and_evaluate(exp, str(tmp_path / name))
    refused = [r.getMessage() for r in caplog.records if "shipped executable" in r.getMessage()]
    if warning:
      assert len(refused) == 1 and warning in refused[0] and "\n" not in refused[0], (name, refused)
    else:
      assert not refused and any("Train step: shipped." in r.getMessage() for r in caplog.records)
    assert result.eval == reference.eval, name
    for a, b in zip(jax.tree.leaves(_params(exp, tmp_path / name)), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(a, b, err_msg=name)


# ------------------------------------------------------------------------------------ the run's cache

_CACHED_PROGRAM = """
import os, sys
import jax, jax.numpy as jnp
from recurrentgemma_tpu import trainer
os.environ.pop(trainer.COMPILATION_CACHE_ENV, None)
print(trainer.enable_compilation_cache(workdir=sys.argv[1]))
jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)))
"""


def test_the_compilation_cache_lives_in_the_run_directory_and_hits_after_a_move(tmp_path):
  """A re-submitted run finds its programs in <workdir>/compilation_cache, also when the run
  directory was copied elsewhere (the cache key must not depend on the cache's path)."""
  import shutil  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  def run(workdir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", _CACHED_PROGRAM, str(workdir)], env=env, check=True,
                         capture_output=True, text=True).stdout
    cache = os.path.join(str(workdir), workdir_lib.COMPILATION_CACHE_DIR)
    assert out.strip() == cache
    return sorted(n for n in os.listdir(cache) if n.endswith("-cache"))

  first = run(tmp_path / "run")
  assert first  # every program compiled once, whatever its compile time
  shutil.copytree(tmp_path / "run", tmp_path / "moved")
  assert run(tmp_path / "moved") == first  # all hits: nothing new written
