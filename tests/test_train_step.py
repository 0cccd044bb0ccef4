"""Optimizer, schedule, loss and step against float64 numpy references (single device)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recurrentgemma_tpu import data as data_lib
from recurrentgemma_tpu import model as model_lib
from recurrentgemma_tpu import optimizer as optimizer_lib
from recurrentgemma_tpu import train_step as ts
from test_sharding import BATCH, build, make_batch, shrunk  # tests/ is on sys.path under pytest


@pytest.mark.parametrize("changes, message", [
    (dict(decay_steps=10, warmup_steps=10), "must exceed warmup_steps"),
    (dict(num_microbatches=0), "num_microbatches=0"),
    (dict(mu_dtype="float16"), "mu_dtype"),
    (dict(final_lr_ratio=2.0), "final_lr_ratio"),
])
def test_optimizer_config_errors(changes, message):
  with pytest.raises(ValueError, match=message):
    optimizer_lib.OptimizerConfig(**changes)


def test_schedule_warmup_then_cosine():
  c = optimizer_lib.OptimizerConfig(learning_rate=1e-3, warmup_steps=10, decay_steps=100, final_lr_ratio=0.1)
  schedule = optimizer_lib.learning_rate_schedule(c)
  for k in [0, 4, 9, 10, 50, 98, 99, 150]:
    t = k + 1  # update k uses the schedule at k + 1 (see learning_rate_schedule)
    if t <= 10:
      want = 1e-3 * t / 10
    else:
      progress = min((t - 10) / 90, 1.0)
      want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * progress))
    np.testing.assert_allclose(float(schedule(k)), want, rtol=1e-5, err_msg=f"update {k}")


def test_weight_decay_mask_excludes_norms_biases_and_rglru():
  mask = optimizer_lib.weight_decay_mask(model_lib.param_logical_axes(shrunk("griffin")))
  block = mask["groups"]["block_0"]
  assert mask["embedder"]["input_embedding"] is True
  assert mask["final_norm"]["scale"] is False
  assert block["mlp_block"]["ffw_up_w"] and block["mlp_block"]["ffw_down_w"]
  assert not block["mlp_block"]["ffw_up_b"] and not block["mlp_block"]["ffw_down_b"]
  rec = block["recurrent_block"]
  assert rec["linear_x_w"] and rec["linear_y_w"] and rec["linear_out_w"] and rec["conv_1d"]["w"]
  assert not rec["linear_x_b"] and not rec["conv_1d"]["b"]
  assert not any(jax.tree.leaves(rec["rg_lru"]))  # gates (weights and biases) and a_param
  att = mask["groups"]["block_2"]["attention_block"]
  assert att["q_w"] and att["k_w"] and att["v_w"] and att["out_w"] and not att["out_b"]


def _numpy_adamw(params, grads_seq, c: optimizer_lib.OptimizerConfig, mask):
  """Clip by global norm, then AdamW, in float64."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  for step, grads in enumerate(grads_seq):
    g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
    norm = math.sqrt(sum(np.sum(x * x) for x in g.values()))
    scale = min(1.0, c.grad_clip_norm / norm)
    t = step + 1
    lr = c.learning_rate * min(t / c.warmup_steps, 1.0)  # still in warmup in this test
    for k in p:
      gk = g[k] * scale
      m[k] = c.b1 * m[k] + (1 - c.b1) * gk
      v2[k] = c.b2 * v2[k] + (1 - c.b2) * gk * gk
      mhat, vhat = m[k] / (1 - c.b1**t), v2[k] / (1 - c.b2**t)
      p[k] = p[k] - lr * (mhat / (np.sqrt(vhat) + c.eps) + c.weight_decay * p[k] * mask[k])
  return p


def test_adamw_with_clipping_and_mask_matches_numpy():
  c = optimizer_lib.OptimizerConfig(learning_rate=0.1, warmup_steps=5, decay_steps=50, weight_decay=0.3,
                         grad_clip_norm=0.5, b2=0.99)
  logical = {"w": ("embed", "mlp"), "scale": ("embed",), "gate": ("rnn_block", None, None)}
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(4, 3)), "scale": rng.normal(size=(4,)), "gate": rng.normal(size=(2, 2, 2))}
  grads_seq = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(3)]
  tx = optimizer_lib.make_optimizer(c, logical)
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(p)
  for g in grads_seq:
    updates, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  want = _numpy_adamw(params, grads_seq, c, {"w": 1.0, "scale": 0.0, "gate": 0.0})
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _ulp_distance(a, b) -> int:
  """Largest distance in units in the last place between two arrays of one float dtype."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape
  if not jnp.issubdtype(a.dtype, jnp.floating):
    return 0 if np.array_equal(a, b) else np.iinfo(np.int64).max
  def ordered(x):
    bits = x.view({2: np.int16, 4: np.int32}[x.dtype.itemsize]).astype(np.int64)
    magnitude = bits & (2 ** (8 * x.dtype.itemsize - 1) - 1)
    return np.where(bits < 0, -magnitude, magnitude)
  return int(np.max(np.abs(ordered(a) - ordered(b)), initial=0))


def test_stacked_leaves_are_the_scanned_groups():
  stacked = optimizer_lib.stacked_leaves(model_lib.param_logical_axes(shrunk("griffin", num_layers=7)))
  assert all(jax.tree.leaves(stacked["groups"]))
  assert not any(jax.tree.leaves({k: v for k, v in stacked.items() if k != "groups"}))


@pytest.mark.parametrize("clip, mu_dtype", [(0.5, "float32"), (0.0, "bfloat16")])
def test_apply_update_is_the_optax_update_one_layer_group_at_a_time(clip, mu_dtype):
  """The train step's update on TPU (stacked leaves per layer group) against optax's chain."""
  logical = {"groups": {"w": ("layers", "embed", "mlp"), "scale": ("layers", "embed"),
                        "gate": ("layers", "rnn_block", None, None)},
             "table": ("vocab", "embed"), "norm": ("embed",)}
  shapes = {"groups": {"w": (3, 4, 6), "scale": (3, 4), "gate": (3, 2, 2, 2)}, "table": (8, 4),
            "norm": (4,)}
  c = optimizer_lib.OptimizerConfig(learning_rate=0.1, warmup_steps=2, decay_steps=20,
                                    weight_decay=0.3, grad_clip_norm=clip, b2=0.99, mu_dtype=mu_dtype)
  tx = optimizer_lib.make_optimizer(c, logical)
  rng = np.random.default_rng(0)
  normal = lambda shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  params = jax.tree.map(normal, shapes, is_leaf=lambda x: isinstance(x, tuple))
  reference = jax.jit(lambda g, s, p: (lambda u, s2: (optax.apply_updates(p, u), s2))(
      *tx.update(g, s, p)))
  ours = jax.jit(functools.partial(optimizer_lib.apply_update, c, logical, per_group=True))
  ref_state = our_state = tx.init(params)
  ref_params = our_params = params
  for _ in range(3):
    grads = jax.tree.map(lambda x: normal(x.shape), params)
    ref_params, ref_state = reference(grads, ref_state, ref_params)
    our_params, our_state = ours(grads, our_state, our_params)
    assert jax.tree.structure(our_state) == jax.tree.structure(ref_state)
    # The same arithmetic; on CPU, LLVM's fused multiply-adds can round the last bit of a few
    # elements differently for a slice than for the whole leaf (with --xla_cpu_max_isa=SSE4_2,
    # which has no FMA, the two are bit-identical).
    for want, got in zip(jax.tree.leaves((ref_params, ref_state)),
                         jax.tree.leaves((our_params, our_state))):
      assert _ulp_distance(got, want) <= 1


def _reference_losses(mc, params, batch):
  apply = jax.jit(lambda p, b: model_lib.apply(p, mc, b["inputs"], segment_ids=b["segment_ids"],
                                                positions=b["positions"]))
  logits = np.asarray(apply(params, batch), np.float64)
  log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  target = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
  w = batch["loss_weights"].astype(np.float64)
  correct = (logits.argmax(-1) == batch["targets"]).astype(np.float64)
  return np.sum((log_z - target) * w), np.sum(log_z**2 * w), np.sum(correct * w), w.sum()


@pytest.mark.slow  # over ~30 s on 2 cores: the slow tier (.ci/run)
def test_loss_z_loss_and_eval_sums_match_float64():
  mc = shrunk("griffin")
  params = model_lib.init_params(mc, jax.random.key(3))
  batch = make_batch(7)
  ce_sum, z_sum, correct, weight = _reference_losses(mc, params, batch)
  opt = optimizer_lib.OptimizerConfig(z_loss=1e-3)
  _, metrics = jax.jit(lambda p, b: ts.compute_gradients(p, b, model_config=mc, opt_config=opt))(params, batch)
  np.testing.assert_allclose(metrics["loss"], ce_sum / weight, rtol=1e-5)
  np.testing.assert_allclose(metrics["z_loss"], z_sum / weight, rtol=1e-5)
  np.testing.assert_allclose(metrics["total_loss"], (ce_sum + 1e-3 * z_sum) / weight, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], correct / weight, rtol=1e-5)
  assert float(metrics["num_tokens"]) == weight
  sums = jax.jit(lambda p, b: ts.eval_step(p, b, model_config=mc))(params, batch)
  np.testing.assert_allclose(sums["loss_sum"], ce_sum, rtol=1e-5)
  assert float(sums["num_tokens"]) == weight and float(sums["correct"]) == correct


def test_step_applies_adamw_to_the_gradients_and_counts_steps():
  mc = shrunk("mqa")
  fns = build(mc, (1, 1, 1, 1), grad_clip_norm=0.0, weight_decay=0.0)
  state = fns.create_state(jax.random.key(0))
  params0 = jax.device_get(state.params)
  batch = data_lib.to_global_arrays(make_batch(4), fns.batch_shardings["inputs"], BATCH)
  grads, _ = fns.gradients(state.params, batch)
  grads = jax.device_get(grads)
  new_state, metrics = fns.train_step(state, batch)
  lr = 3e-4 / 2  # warmup_steps=2 in `build`: update 0 uses half the peak
  np.testing.assert_allclose(metrics["learning_rate"], lr, rtol=1e-6)
  # First Adam update: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps).
  for p0, g, p1 in zip(jax.tree.leaves(params0), jax.tree.leaves(grads), jax.tree.leaves(new_state.params)):
    g = np.asarray(g, np.float64)
    np.testing.assert_allclose(np.asarray(p1), np.asarray(p0) - lr * g / (np.abs(g) + 1e-8), rtol=1e-5,
                               atol=1e-7)
  assert int(new_state.step) == 1
