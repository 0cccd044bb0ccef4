"""Meshes, rule tables and sharded train steps on 8 CPU devices (tests/conftest.py sets them up).

Sharded results are checked against the same computation on one device; parameter shardings against
a table written out by hand from the Griffin paper's scheme (not against the rule code itself).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import ladder
from recurrentgemma_tpu import data as data_lib
from recurrentgemma_tpu import model as model_lib
from recurrentgemma_tpu import optimizer as optimizer_lib
from recurrentgemma_tpu import step_functions
from sharding import hlo
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib

SEQ_LEN = 32
BATCH = 8


def shrunk(family: str, **overrides) -> model_lib.ModelConfig:
  """The paper's 14B preset of `family` with every size shrunk, structure (gate blocks=16) kept."""
  c = ladder.get_config(f"{family},14b").model
  c.update(dict(vocab_size=512, width=64, lru_width=128, num_layers=4, num_heads=8, head_dim=8,
                attention_window=8, dtype="float32", scan_impl="xla_linear"))
  c.update(overrides)
  return model_lib.ModelConfig.from_config(c)


def make_batch(seed: int, vocab: int = 512) -> dict[str, np.ndarray]:
  """Packed rows with two documents each and padding at the end, like the data pipeline's."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, vocab, (BATCH, SEQ_LEN)).astype(np.int32)
  targets = rng.integers(1, vocab, (BATCH, SEQ_LEN)).astype(np.int32)
  segment_ids = np.zeros((BATCH, SEQ_LEN), np.int32)
  positions = np.zeros((BATCH, SEQ_LEN), np.int32)
  for b in range(BATCH):
    cut, end = rng.integers(5, 20), rng.integers(24, SEQ_LEN + 1)
    segment_ids[b, :cut], segment_ids[b, cut:end] = 1, 2
    positions[b, :cut], positions[b, cut:end] = np.arange(cut), np.arange(end - cut)
  return dict(inputs=inputs, targets=targets, segment_ids=segment_ids, positions=positions,
              loss_weights=(segment_ids > 0).astype(np.float32))


def build(mc, mesh_sizes, strategy="griffin", **opt):
  data, fsdp, seq, model = mesh_sizes
  devices = jax.devices()[: data * fsdp * seq * model]
  mesh = mesh_lib.create_mesh(mesh_lib.MeshConfig(strategy, data, fsdp, seq, model), devices)
  return step_functions.build_step_functions(
      mc, optimizer_lib.OptimizerConfig(warmup_steps=2, decay_steps=10, **opt), mesh, strategy)


def shard(fns, batch):
  """A process-local numpy batch as global arrays laid out like the step functions' batch."""
  return data_lib.to_global_arrays(batch, fns.batch_shardings["inputs"], BATCH)


@functools.lru_cache(maxsize=None)
def reference(family: str):
  """Params, batch and (grads, metrics) computed on a single device."""
  mc = shrunk(family)
  fns = build(mc, (1, 1, 1, 1))
  params = jax.device_get(fns.create_state(jax.random.key(0)).params)
  batch = make_batch(1)
  grads, metrics = fns.gradients(params, shard(fns, batch))
  return mc, params, batch, jax.device_get(grads), jax.device_get(metrics)


def assert_tree_close(actual, expected, rel=2e-5):
  flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
  flat_e = jax.tree.leaves(expected)
  assert len(flat_a) == len(flat_e)
  for (path, a), e in zip(flat_a, flat_e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    scale = max(np.abs(e).max(), 1e-12)
    np.testing.assert_allclose(a, e, rtol=rel, atol=rel * scale, err_msg=jax.tree_util.keystr(path))


# --------------------------------------------------------------------------------- meshes


def test_mesh_fills_one_axis_and_orders_axes():
  mesh = mesh_lib.create_mesh(mesh_lib.MeshConfig(data=2, fsdp=-1, seq=1, model=2))
  assert mesh.axis_names == ("slice", "data", "fsdp", "seq", "model")
  assert dict(mesh.shape) == {"slice": 1, "data": 2, "fsdp": 2, "seq": 1, "model": 2}
  # `model` innermost: neighbouring devices share a tensor-parallel group.
  assert [d.id for d in mesh.devices[0, 0, 0, 0, :]] == [0, 1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(data=-1, fsdp=-1), "at most one mesh axis may be -1"),
    (dict(data=3, fsdp=-1), "cannot fill -1 for 'fsdp'"),
    (dict(data=2, fsdp=2), "has 4 devices per slice but there are 8"),
    (dict(model=0), "must be >= 1 or -1"),
    (dict(fsdp=-1, num_slices=3), "cannot be split into mesh.num_slices=3"),
])
def test_mesh_errors_name_the_problem(kwargs, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.create_mesh(mesh_lib.MeshConfig(**kwargs))


def test_multislice_needs_slice_index():
  # CPU devices carry no slice_index, so asking for 2 slices must fail clearly, not fold silently.
  with pytest.raises(ValueError, match="slice_index"):
    mesh_lib.create_mesh(mesh_lib.MeshConfig(fsdp=-1, num_slices=2))


# ---------------------------------------------------------------------------------- rules

# The Griffin-paper partitioning, written out per parameter of one block; parameters of the scanned
# layer groups carry an extra leading `layers` axis, which is never sharded.
EXPECTED_GRIFFIN = {
    "input_embedding": P("model", "fsdp"),
    "final_norm.scale": P("fsdp"),
    "temporal_pre_norm.scale": P("fsdp"),
    "channel_pre_norm.scale": P("fsdp"),
    "ffw_up_w": P(None, "fsdp", "model"),  # column-parallel, both branches
    "ffw_up_b": P(None, "model"),
    "ffw_down_w": P("model", "fsdp"),  # row-parallel
    "ffw_down_b": P("fsdp"),
    "linear_x_w": P("fsdp", "model"),
    "linear_y_w": P("fsdp", "model"),
    "linear_x_b": P("model"),
    "linear_y_b": P("model"),
    "conv_1d.w": P(None, "model"),  # per-channel: shards with the channels
    "conv_1d.b": P("model"),
    "a_gate.w": P("model", None, None),  # whole gate blocks per model shard
    "a_gate.b": P("model", None),
    "input_gate.w": P("model", None, None),
    "input_gate.b": P("model", None),
    "a_param": P("model"),
    "linear_out_w": P("model", "fsdp"),
    "linear_out_b": P("fsdp"),
    "q_w": P("fsdp", "model", None),  # query heads on model
    "k_w": P("fsdp", None),  # the single MQA key/value head: replicated over model
    "v_w": P("fsdp", None),
    "out_w": P("model", None, "fsdp"),
    "out_b": P("fsdp"),
}


def _expected_spec(path: str) -> P:
  matches = [k for k in EXPECTED_GRIFFIN if path == k or path.endswith("." + k)]
  assert len(matches) == 1, f"no single expectation for {path}: {matches}"
  return EXPECTED_GRIFFIN[matches[0]]


def _norm_spec(spec: P, ndim: int) -> tuple:
  entries = tuple(spec) + (None,) * (ndim - len(spec))
  return tuple(e[0] if isinstance(e, tuple) and len(e) == 1 else e for e in entries)


@pytest.mark.parametrize("family", ["griffin", "mqa"])
def test_state_is_created_sharded_as_the_griffin_table_says(family):
  fns = build(shrunk(family), (2, 2, 1, 2))
  state = fns.create_state(jax.random.key(0))
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  names = [".".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]
  assert len(flat) > 10
  for name, (_, arr) in zip(names, flat):
    spec = _expected_spec(name)
    want = _norm_spec(P(None, *spec) if name.startswith("groups.") else spec, arr.ndim)
    assert _norm_spec(arr.sharding.spec, arr.ndim) == want, name
    # Created in place: each device holds exactly its shard, never the whole array.
    shard = arr.addressable_shards[0].data.shape
    parts = [1 if e is None else int(np.prod([fns.mesh.shape[a] for a in np.atleast_1d(e)])) for e in want]
    assert shard == tuple(d // p for d, p in zip(arr.shape, parts)), name
  # Adam moments are sharded like their parameters (ZeRO-3 of optimizer state).
  mu = state.opt_state[1][0].mu
  for (path, m), (_, p) in zip(jax.tree_util.tree_flatten_with_path(mu)[0], flat):
    assert m.sharding == p.sharding, jax.tree_util.keystr(path)


def test_report_lists_every_state_array_with_per_device_bytes():
  fns = build(shrunk("griffin"), (2, 2, 1, 2))
  rows, text = fns.state_report()
  assert len(rows) == len(jax.tree.leaves(fns.abstract_state))
  emb = next(r for r in rows if r["path"] == ".params['embedder']['input_embedding']")
  assert emb["logical"] == ("vocab", "embed") and emb["spec"] == P("model", "fsdp")
  assert emb["device_bytes"] == 512 * 64 * 4 // (2 * 2)
  assert f"{len(rows)} arrays" in text


def test_fsdp_strategy_shards_only_embed_and_dp_replicates():
  mc = shrunk("griffin")
  fsdp = build(mc, (1, 8, 1, 1), strategy="fsdp")
  spec = fsdp.state_shardings.params["groups"]["block_0"]["mlp_block"]["ffw_up_w"].spec
  assert _norm_spec(spec, 4) == (None, None, "fsdp", None)
  dp = build(mc, (8, 1, 1, 1), strategy="dp")
  assert all(s.spec == P() or all(e is None for e in s.spec) for s in jax.tree.leaves(dp.state_shardings.params))


def test_activation_rules_put_batch_before_embed():
  rules = rules_lib.rules_for("griffin")
  assert rules_lib.logical_to_spec(("batch", "length", "embed"), rules) == P(("slice", "data", "fsdp"), "seq", None)
  assert rules_lib.logical_to_spec(("batch", "length", "mlp"), rules) == P(("slice", "data", "fsdp"), "seq", "model")


@pytest.mark.parametrize("mc_kwargs, mesh_sizes, strategy, message", [
    (dict(num_gate_blocks=4), (1, 1, 1, 8), "griffin", r"a_gate.*dim 4 on model"),
    ({}, (1, 8, 1, 1), "zero", "is not one of"),
])
def test_build_rejects_bad_plans_before_compiling(mc_kwargs, mesh_sizes, strategy, message):
  with pytest.raises(ValueError, match=message):
    build(shrunk("griffin", **mc_kwargs), mesh_sizes, strategy=strategy)


def test_strategy_must_use_the_mesh_axes_it_is_given():
  # Checked once, when the experiment is built (build_step_functions trusts it).
  with pytest.raises(ValueError, match=r"does not shard over mesh axes \{'model': 2\}"):
    rules_lib.check_strategy_mesh("fsdp", {"slice": 1, "data": 1, "fsdp": 4, "seq": 1, "model": 2})


def test_batch_shape_errors():
  fns = build(shrunk("griffin"), (2, 2, 1, 2))
  with pytest.raises(ValueError, match="does not divide over the 4 batch shards"):
    fns.abstract_batch(6, SEQ_LEN)
  with pytest.raises(ValueError, match="num_microbatches=3"):
    step_functions.check_batch_shape(8, SEQ_LEN, fns.mesh, 3, fns.rules)
  # The batch for lowering is checked against the micro-batches too: 4 micro-batches of 2 rows
  # cannot spread over 4 batch shards.
  micro = build(shrunk("griffin"), (2, 2, 1, 2), num_microbatches=4)
  with pytest.raises(ValueError, match="micro-batch of 2 sequences"):
    micro.abstract_batch(BATCH, SEQ_LEN)


# ----------------------------------------------------------- sharded == single device

MESHES = {  # (data, fsdp, seq, model)
    "8x1x1": (8, 1, 1, 1),
    "1x8x1": (1, 8, 1, 1),
    "1x1x8": (1, 1, 1, 8),
    "2x2x2": (2, 2, 1, 2),
    "seq2": (1, 2, 2, 2),
}


# Griffin (which has all three block types) on every mesh; Hawk and MQA on the meshes that shard
# their distinctive blocks (tensor and sequence parallel). RG_FULL_GRID=1 runs every pair (~2x time).
GRID = [("griffin", m) for m in MESHES] + [(f, m) for f in ("hawk", "mqa") for m in ("1x1x8", "seq2")]
if os.environ.get("RG_FULL_GRID") == "1":
  GRID = [(f, m) for f in ("griffin", "hawk", "mqa") for m in MESHES]


@pytest.mark.slow
@pytest.mark.parametrize("family, mesh_name", GRID)
def test_sharded_loss_and_grads_equal_single_device(family, mesh_name):
  mc, params, batch, ref_grads, ref_metrics = reference(family)
  fns = build(mc, MESHES[mesh_name])
  sharded_params = jax.device_put(params, fns.state_shardings.params)
  grads, metrics = fns.gradients(sharded_params, shard(fns, batch))
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
  assert float(metrics["num_tokens"]) == float(ref_metrics["num_tokens"])
  # Gradients come back laid out like the parameters (ZeRO-sharded), and equal the reference.
  for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(fns.state_shardings.params)):
    assert g.sharding.is_equivalent_to(s, g.ndim)
  assert_tree_close(jax.device_get(grads), ref_grads)


@pytest.mark.slow  # over ~30 s on 2 cores: the slow tier (.ci/run)
def test_train_step_metrics_match_single_device_and_microbatches():
  mc, params, batch, ref_grads, ref_metrics = reference("griffin")
  fns = build(mc, (2, 2, 1, 2), num_microbatches=2)
  state = fns.create_state(jax.random.key(0))
  state = state.replace(params=jax.device_put(params, fns.state_shardings.params))
  new_state, metrics = fns.train_step(state, shard(fns, batch))
  # Two strided micro-batches (4 rows each, one per batch shard) accumulate to the single-device,
  # single-pass gradient.
  ref_norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(ref_grads)))
  np.testing.assert_allclose(metrics["grad_norm"], ref_norm, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
  assert int(new_state.step) == 1
  np.testing.assert_allclose(metrics["learning_rate"], 3e-4 / 2, rtol=1e-6)  # warmup 2: step 0 -> 1/2
  # The state keeps its shardings through the step (donated and updated in place).
  for a, s in zip(jax.tree.leaves(new_state), jax.tree.leaves(fns.state_shardings)):
    assert a.sharding.is_equivalent_to(s, a.ndim)


# ----------------------------------------------- no communication inside the recurrence


def test_model_sharded_recurrence_has_no_collectives():
  mc = shrunk("hawk")
  fns = build(mc, (1, 1, 1, 8))
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        fns.abstract_state.params, fns.state_shardings.params)
  lowered = fns.grad_fn.lower(params, fns.abstract_batch(BATCH, SEQ_LEN))
  text = lowered.compile().as_text()
  loops = hlo.while_loops(text)
  time_loops = [l for l in loops if l["trip_count"] == SEQ_LEN]
  # Forward scans and their transposes (and the remat recomputation) all run over time.
  assert len(time_loops) >= 2, [(l["body"], l["trip_count"]) for l in loops]
  for loop in time_loops:
    assert loop["collectives"] == [], loop["body"]
  # The partitioning really is tensor-parallel, and the check sees inside loops: the layer loop around
  # the recurrence all-reduces after the row-parallel projections.
  layer_loops = [l for l in loops if l["trip_count"] == mc.num_groups]
  assert layer_loops and all(any("all-reduce" in c for c in l["collectives"]) for l in layer_loops)


def test_scan_placement_follows_mesh_and_rules():
  mesh = mesh_lib.create_mesh(mesh_lib.MeshConfig(fsdp=2, seq=2, model=2))
  placement = step_functions.scan_placement(mesh, rules_lib.rules_for("griffin"))
  assert dict(placement.mesh.shape) == dict(mesh.shape)
  axes = (placement.batch_axes, placement.time_axes, placement.channel_axes)
  assert axes == (("slice", "data", "fsdp"), "seq", "model")
  # Static and hashable: a module attribute and part of the jit cache key.
  assert hash(placement) == hash(step_functions.scan_placement(mesh, rules_lib.rules_for("griffin")))


# ------------------------------------------------------------------------------- step-time model
# Programs compiled for a TPU topology through libtpu (see tests/test_compile.py): the collectives,
# HBM bytes and FLOPs are read from the real TPU compiler's output.


def _tpu_mesh(num_slices: int, axes: tuple[str, ...]):
  from sharding import planner  # pylint: disable=g-import-not-at-top
  chip, devices, per_chip = planner.topology_devices("v5p:2x2x1", num_slices=num_slices)
  devices = sorted(devices, key=lambda d: (getattr(d, "slice_index", 0), d.id))
  grid = np.asarray(devices).reshape((num_slices, -1) if num_slices > 1 else (-1,))
  return chip, jax.sharding.Mesh(grid, axes), per_chip


@pytest.mark.tpu_compile
def test_collectives_read_from_a_compiled_multislice_program():
  """Every collective of a known program, its payload, group, DCN crossing and loop count."""
  from sharding import hlo as hlo_lib  # pylint: disable=g-import-not-at-top
  _, mesh, _ = _tpu_mesh(2, ("slice", "x"))
  rows, cols = 256, 1024  # one f32 shard: 1 MiB

  def body(x):
    a = jax.lax.psum(x, "x")
    g = jax.lax.all_gather(x, "x", tiled=True)
    r = jax.lax.psum_scatter(x * 2, "x", tiled=True)
    d = jax.lax.psum(x * 3, "slice")
    return (a.sum() + g.sum() + r.sum() + d.sum()).reshape(1)

  def f(x):
    step = jax.shard_map(body, mesh=mesh, in_specs=P(("slice", "x")), out_specs=P(("slice", "x")))
    return jax.lax.fori_loop(0, 3, lambda i, acc: acc + step(x + i).sum(), jnp.zeros((), jnp.float32))

  x = jax.ShapeDtypeStruct((8 * rows, cols), jnp.float32,
                           sharding=jax.sharding.NamedSharding(mesh, P(("slice", "x"))))
  traffic = hlo_lib.traffic(jax.jit(f).lower(x).compile().as_text(), num_devices=8, num_slices=2)
  assert traffic.exact
  found = {(c.kind, c.nbytes, c.group_size, c.num_slices, c.count) for c in traffic.collectives}
  mib = float(rows * cols * 4)
  assert ("all-reduce", mib, 4, 1, 3.0) in found  # psum over x: ICI, inside the 3-trip loop
  assert ("all-gather", 4 * mib, 4, 1, 3.0) in found  # the gathered result
  assert ("reduce-scatter", mib, 4, 1, 3.0) in found  # the input being scattered
  assert ("all-reduce", mib, 2, 2, 3.0) in found  # psum over slice: a DCN transfer
  assert all(c.num_slices == 1 or c.group_size == 2 for c in traffic.collectives)


@pytest.mark.slow  # 47 s wall at load average ~27 (two TPU compiles)
@pytest.mark.tpu_compile
def test_step_time_ranks_a_communication_heavy_mesh_below_a_balanced_one():
  """A small residual MLP trained on 4 v5p chips two ways: data parallel (one gradient all-reduce per
  weight) and with the width split over the chips (activations all-reduced in every matmul)."""
  from sharding import planner  # pylint: disable=g-import-not-at-top
  chip, mesh, per_chip = _tpu_mesh(1, ("x",))
  tokens, width, hidden, layers = 4096, 256, 1024, 2

  def loss(params, x):
    def layer(h, w):
      w1, w2 = w
      return h + jnp.einsum("nf,fd->nd", jax.nn.gelu(jnp.einsum("nd,df->nf", h, w1)), w2), None
    h, _ = jax.lax.scan(layer, x, params)
    return jnp.mean(h.astype(jnp.float32) ** 2)

  def step(params, x):
    return jax.tree.map(lambda p, g: p - 1e-3 * g, params, jax.grad(loss)(params, x))

  def estimate(w1_spec, w2_spec, x_spec):
    sh = lambda s: jax.sharding.NamedSharding(mesh, s)
    params = (jax.ShapeDtypeStruct((layers, width, hidden), jnp.bfloat16, sharding=sh(w1_spec)),
              jax.ShapeDtypeStruct((layers, hidden, width), jnp.bfloat16, sharding=sh(w2_spec)))
    x = jax.ShapeDtypeStruct((tokens, width), jnp.bfloat16, sharding=sh(x_spec))
    compiled = jax.jit(step, out_shardings=(sh(w1_spec), sh(w2_spec))).lower(params, x).compile()
    return planner.step_time(compiled.as_text(), chip, 4, 1, per_chip)

  balanced = estimate(P(), P(), P("x", None))
  heavy = estimate(P(None, "x", None), P(None, None, "x"), P(None, "x"))
  assert balanced.exact and heavy.exact
  # The same matmuls either way (loop trip counts applied): fwd + 2 bwd, 2 weights per layer, / 4 chips.
  expected = 3 * layers * 2 * 2 * tokens * width * hidden / 4 / chip.peak_bf16_flops
  np.testing.assert_allclose(balanced.compute_s, expected, rtol=0.05)
  np.testing.assert_allclose(heavy.compute_s, expected, rtol=0.05)
  # Data parallel all-reduces each gradient once: 2 weights x layers x width x hidden bf16, ring 2(n-1)/n.
  grad_bytes = 2 * layers * width * hidden * 2
  assert balanced.collective_bytes == pytest.approx(grad_bytes, rel=0.1)
  np.testing.assert_allclose(balanced.ici_s, 2 * grad_bytes * 3 / 4 / (2 * chip.ici_link_bandwidth), rtol=0.1)
  assert heavy.collective_bytes > 10 * balanced.collective_bytes
  assert heavy.ici_s > 10 * balanced.ici_s
  assert heavy.step_s > 2 * balanced.step_s


def test_search_table_ranks_fitting_plans_by_the_compiled_step_time():
  """The order of compiles (the analytic pre-estimate) is not the order of the result table."""
  from sharding import chips, planner  # pylint: disable=g-import-not-at-top
  chip = chips.CHIPS["v5p"]

  def result(plan, pre_estimate_s, step_s, status="fits"):
    report = planner.CompileReport(
        topology="v5p:2x2x1", num_slices=1, chip=chip, devices_per_chip=1, mesh={"fsdp": 4},
        argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=2**30, code_bytes=0,
        compiled_flops=1e12, xla_flops=1e12, flops_exact=True, six_nd_per_chip=1e12,
        max_hbm_fraction=0.95, compile_seconds=1.0,
        step=planner.StepTime(step_s, 0.001, step_s / 10, 0.0, 1e6, True))
    return planner.SearchResult(plan, planner.Estimate(pre_estimate_s, 0, 0, 0, 0, 0, 1), status, report)

  dp = planner.Plan(1, 4, 1, 1, "none", 1)
  tp = planner.Plan(1, 1, 1, 4, "none", 1)
  table = planner.format_search([result(tp, 0.001, 0.05), result(dp, 0.002, 0.01)])
  rows = [line for line in table.splitlines() if line.strip().startswith(("1 ", "2 "))]
  assert "1x4x1x1" in rows[0] and "1x1x1x4" in rows[1], table
  # MFU = 6ND per chip / (estimated step x peak).
  assert f"{1e12 / (0.011 * chip.peak_bf16_flops):.1%}" in rows[0], table
