"""Ahead-of-time planning: HLO FLOP counting, chip table, TPU meshes and the compile CLI.

TPU programs are compiled on this CPU host through libtpu (jax.experimental.topologies); nothing runs
on a TPU. The CLI is run as a subprocess, exactly as a user would.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sharding import chips
from sharding import hlo
from sharding import mesh as mesh_lib
from sharding import planner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.tpu_compile


def _scan_program(x, w, q):
  """Layer scan of matmuls (batch dims included) plus a batched attention-like contraction."""
  def layer(h, w_l):
    return jnp.tanh(jnp.einsum("bsd,de->bse", h, w_l)), None
  h, _ = jax.lax.scan(layer, x, w)
  scores = jnp.einsum("bqd,bkd->bqk", h, q)
  return jnp.sum(jnp.tanh(scores))  # tanh: the cotangent of the scores is not a constant


def _expected_flops(B, S, D, L, K):
  # forward: L layers of 2BSD^2 and one 2BSKD; backward: twice each (w.r.t. both operands).
  return 3 * (L * 2 * B * S * D * D + 2 * B * S * K * D)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_matmul_flops_apply_loop_trip_counts(platform):
  B, S, D, L, K = 4, 24, 256, 7, 40
  if platform == "tpu":
    _, devices, _ = planner.topology_devices("v5p:2x2x1")
    mesh = jax.sharding.Mesh(np.asarray(devices[:1]), ("x",))
  else:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("x",))
  rep = NamedSharding(mesh, P())
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=rep) for s in [(B, S, D), (L, D, D), (B, K, D)]]
  compiled = jax.jit(jax.grad(_scan_program, argnums=(0, 1, 2))).lower(*args).compile()
  count = hlo.matmul_flops(compiled.as_text())
  assert count.exact and sorted(n for _, n in count.loops) == [L, L]
  assert count.flops == _expected_flops(B, S, D, L, K)
  # XLA's own count sees each loop body once: that is why the HLO is read here.
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  assert xla["flops"] < 0.5 * count.flops


def test_topologies_give_the_chip_tables_devices():
  for topology, name, per_chip in [("v4:2x2x1", "v4", 2), ("v5e:2x2", "v5e", 1), ("v5p:2x2x1", "v5p", 1),
                                   ("v6e:2x2", "v6e", 1)]:
    chip, devices, k = planner.topology_devices(topology)
    assert chip.name == name and k == per_chip
    assert chips.chip_for_device_kind(devices[0].device_kind) is chip
    assert len(devices) == 4 * per_chip


def test_multislice_mesh_puts_only_slice_on_dcn():
  _, devices, _ = planner.topology_devices("v5p:2x2x1", num_slices=2)
  mesh = mesh_lib.create_mesh(mesh_lib.MeshConfig(fsdp=-1, model=2, num_slices=2), devices)
  assert dict(mesh.shape) == {"slice": 2, "data": 1, "fsdp": 2, "seq": 1, "model": 2}
  for s in range(2):
    assert {d.slice_index for d in mesh.devices[s].flat} == {s}


def test_step_estimate_components():
  stats = planner.ModelStats(num_params=10**9, width=2048, num_layers=24, vocab_size=32000,
                             matmul_flops_per_token=2e9, global_batch=64, seq_len=2048)
  chip = chips.CHIPS["v5p"]
  base = planner.estimate_step(planner.Plan(1, 8, 1, 1, "none", 1), stats, chip, 1)
  assert base.tp_s == 0 and base.seq_s == 0 and base.dcn_s == 0
  # compute: 3 x forward FLOPs over 8 chips at peak.
  np.testing.assert_allclose(base.compute_s, 3 * 2e9 * 64 * 2048 / (8 * chip.peak_bf16_flops))
  tp = planner.estimate_step(planner.Plan(1, 4, 1, 2, "none", 1), stats, chip, 1)
  assert tp.tp_s > 0 and tp.fsdp_s < base.fsdp_s  # smaller ZeRO shards to gather
  micro = planner.estimate_step(planner.Plan(1, 8, 1, 1, "none", 4), stats, chip, 1)
  assert micro.fsdp_s == pytest.approx(4 * base.fsdp_s) and micro.memory_bytes < base.memory_bytes
  remat = planner.estimate_step(planner.Plan(1, 8, 1, 1, "block", 1), stats, chip, 1)
  assert remat.compute_s == pytest.approx(base.compute_s * 4 / 3)
  dcn = planner.estimate_step(planner.Plan(1, 8, 1, 1, "none", 1), stats, chip, 2)
  assert dcn.dcn_s > 0


def _cli(*args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "recurrentgemma_tpu.compile", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  return proc.returncode, proc.stdout, proc.stderr


def test_cli_rejects_a_bad_mesh_before_compiling():
  code, out, err = _cli("--config=configs/tiny.py", "--topology=v5p:2x2x1", "--mesh=3,1,1,1")
  assert code == 2, (out, err)
  assert "has 3 devices per slice but there are 4" in err


def test_cli_tiny_multislice_and_exit_status_gates_on_fit():
  # The real step: scan_impl 'auto' lowers to the Pallas TPU kernel, run per shard under shard_map.
  # A fitting compile exiting 0 is covered by the 14B test below; here an impossible HBM limit must
  # turn the same report into exit status 4 (exit_codes.NO_FIT).
  args = ["--config=configs/tiny.py", "--topology=v5p:2x2x1", "--num_slices=2", "--mesh=1,-1,1,2",
          "--max_hbm_fraction=1e-6"]
  code, out, err = _cli(*args)
  assert code == 4, err[-3000:]
  assert "mesh: slice=2 data=1 fsdp=2 seq=1 model=2" in out and "FITS: NO" in out


def _field(text, name):
  return float(re.search(rf"{name}\s+([\d.]+) GiB", text).group(1))


@pytest.mark.slow
def test_cli_compiles_reduced_depth_griffin_14b_on_v5p():
  """One (recurrent, recurrent, local attention) group of the paper's 14B at full width on 4 chips."""
  code, out, err = _cli("--config=configs/griffin_14b.py", "--topology=v5p:2x2x1", "--mesh=1,-1,1,2",
                        "--config.model.num_layers=3", "--batch=4", "--seq_len=512")
  assert code == 0, err[-3000:]
  assert "FITS: yes" in out
  # ZeRO-3 x tensor parallelism over 4 chips: each holds a quarter of params + Adam moments (f32).
  from configs import ladder  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  c = ladder.get_config("griffin,14b").model
  c.num_layers = 3
  mc = model_lib.ModelConfig.from_config(c)
  shapes = jax.eval_shape(lambda: model_lib.init_params(mc, jax.random.key(0)))
  num_params = sum(x.size for x in jax.tree.leaves(shapes))
  state_gib = 12 * num_params / 4 / 2**30
  assert _field(out, "arguments") == pytest.approx(state_gib, rel=0.03)
  ratio = float(re.search(r"ratio ([\d.]+)", out).group(1))
  assert 1.0 < ratio < 1.6, out  # matmuls of fwd + bwd (+ attention, remat) vs 6ND


def test_search_ranks_by_estimate_and_compiles_in_that_order():
  from recurrentgemma_tpu import compile as compile_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  config = experiment_lib.load_config(os.path.join(REPO, "configs", "tiny.py"),
                                      ["model.scan_impl=xla_linear"])
  exp = experiment_lib.build(config, num_devices=4)
  logs = []
  results = compile_lib.search_experiment(exp, "v5p:2x2x1", remats=["none", "block"],
                                          microbatches=[1, 2], max_model=4, max_seq=1, max_compiles=2,
                                          want=1, log=logs.append)
  steps = [r.estimate.step_s for r in results]
  assert steps == sorted(steps)
  # tiny has 2 heads and 2 gate blocks: model=4 would split them, so the rule check rejects it
  # before compiling.
  assert any(line.startswith("  rejected 1x1x1x4: these arrays do not divide") for line in logs), logs
  assert all(r.plan.model <= 2 for r in results)
  tried = [r for r in results if r.status != "not compiled"]
  assert tried and tried[0] is results[0]  # the best estimate is compiled first
  assert tried[-1].status == "fits" and tried[-1].report.fits
  assert all(r.status == "not compiled" for r in results[len(tried):])


_STEP2_LOOP = """HloModule step2

%body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,8] get-tuple-element(%p), index=1
  %d1 = f32[8,8] dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %d2 = f32[8,8] dot(%d1, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %two = s32[] constant(2)
  %next = s32[] add(%i, %two)
  ROOT %t = (s32[], f32[8,8]) tuple(%next, %d2)
}

%cond (p: (s32[], f32[8,8])) -> pred[] {
  %p = (s32[], f32[8,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(16)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8,8]) -> f32[8,8] {
  %x = f32[8,8] parameter(0)
  %start = s32[] constant(START)
  %init = (s32[], f32[8,8]) tuple(%start, %x)
  %w = (s32[], f32[8,8]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,8] get-tuple-element(%w), index=1
}
"""


@pytest.mark.parametrize("start, trips", [(0, 8), (4, 6), (3, 7)])
def test_loop_counting_in_steps_of_two(start, trips):
  """TPU XLA's windowed einsums unroll by two: the counter steps by 2 and the body holds two matmuls."""
  count = hlo.matmul_flops(_STEP2_LOOP.replace("START", str(start)))
  assert count.loops == [("body", trips)]
  assert count.flops == trips * 2 * (2 * 8 * 8 * 8)


def _program(compiled) -> str:
  """A compiled program's computations, less what names the tracing rather than the program: the
  source-location tables after the module's header, each instruction's metadata, and the numbers
  in instruction and computation names (renumbered in order of appearance)."""
  header, tables = compiled.as_text().split("\nFileNames\n", 1)
  body = tables[re.search(r"^(%|ENTRY)", tables, re.M).start():]
  body = re.sub(r",? ?stack_frame_id=\d+", "", re.sub(r", metadata=\{[^}]*\}", "", body))
  names = {}
  return header + re.sub(r"%[\w.-]+", lambda m: names.setdefault(m.group(0), f"%v{len(names)}"), body)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_a_step_traced_for_its_mesh_s_platform_is_the_program_jax_s_lowering_keeps(platform,
                                                                                  monkeypatch):
  """The step functions trace only their mesh platform's branches of `platform_dependent` (the
  fused CPU loss, the Pallas or XLA scan, ...); the compiled train step is the one
  jax.lax.platform_dependent gives after tracing every branch, instruction for instruction."""
  import contextlib  # pylint: disable=g-import-not-at-top

  import pallas_kernels  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import step_functions  # pylint: disable=g-import-not-at-top
  from test_train_common import small_config  # pylint: disable=g-import-not-at-top

  exp = experiment_lib.build(small_config(), num_devices=4)
  devices = planner.topology_devices("v5p:2x2x1")[1] if platform == "tpu" else jax.devices()[:4]
  mesh = mesh_lib.create_mesh(exp.mesh, devices)

  def compiled():
    fns = step_functions.build_step_functions(exp.model, exp.optimizer, mesh, exp.mesh.strategy)
    return fns.lower_train_step(exp.data.global_batch_size, exp.data.seq_len).compile()

  pruned = compiled()
  monkeypatch.setattr(pallas_kernels, "tracing_for", lambda _: contextlib.nullcontext())
  every_branch = compiled()
  assert _program(pruned) == _program(every_branch)
  kernels = _program(pruned).count('custom_call_target="tpu_custom_call"')
  assert kernels == (4 if platform == "tpu" else 0)  # the scan's forward and backward, 2 layers
