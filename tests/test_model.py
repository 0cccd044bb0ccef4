"""Model family: config validation, layers against float64 numpy, packing, decoding, gradients."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from recurrentgemma_tpu.model import (BLOCK_TYPES, ModelConfig, apply, decode, init_cache,
                                      init_params, make_segments, param_logical_axes)
from recurrentgemma_tpu.model import attention, layers, rglru

LOGICAL_NAMES = {"batch", "length", "embed", "vocab", "mlp", "heads", "kv", "head_dim", "rnn",
                 "rnn_block", "conv", "layers", None}


def small(family: str = "griffin", **kw) -> ModelConfig:
  """The base config shrunk: every feature on (lru_width != width, several heads and blocks)."""
  fields = dict(base.model())
  fields.update(vocab_size=61, width=32, num_layers=4, block_pattern=family, num_heads=4,
                lru_width=48, num_gate_blocks=3, attention_window=5, logits_soft_cap=0.0)
  fields.update(kw)
  return ModelConfig.from_config(fields)


def _tokens(b, t, vocab=61, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, vocab)


def _perturbed_params(cfg, seed=0):
  """Random init plus noise, so zero-initialised norms and biases are exercised too."""
  # Settings that do not change parameter shapes share one (cached) initialisation.
  shape_cfg = cfg.replace(dtype="float32", remat="none", scan_layers=True, scan_impl="auto",
                          logits_soft_cap=0.0, embeddings_scale_by_sqrt_dim=False)
  return _perturbed_params_cached(shape_cfg, seed)


@functools.lru_cache(maxsize=None)
def _perturbed_params_cached(cfg, seed):
  params = init_params(cfg, jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), params)


# ----------------------------------------------------------------------------------- config


@pytest.mark.parametrize("field,value,needle", [
    ("remat", "full", "remat='full' must be one of"),
    ("block_pattern", "recurrent,attention", "'attention'"),
    ("num_gate_blocks", 5, "num_gate_blocks=5 must divide lru_width=48"),
    ("lambda_init", "uniform", "lambda_init='uniform' must be one of"),
    ("width", 30, "num_heads=4 must divide width=30"),
    ("dtype", "fp8", "dtype='fp8' must be one of"),
    ("scan_impl", "cuda", "scan_impl='cuda' must be one of"),
    ("rope_fraction", 0.3, "rope_fraction=0.3"),
])
def test_config_rejects_bad_values_naming_the_field(field, value, needle):
  with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    small(**{field: value})


def test_config_rejects_unknown_fields():
  fields = dict(base.model(), widht=3)
  with pytest.raises(ValueError,
                     match=r"config\.model\.widht is not a field.*did you mean config\.model\.width"):
    ModelConfig.from_config(fields)


def test_block_types_repeat_the_pattern_with_a_remainder():
  cfg = small(num_layers=8)
  assert cfg.block_types == ("recurrent", "recurrent", "local_attention") * 2 + ("recurrent",) * 2
  assert (cfg.num_groups, cfg.remainder_types) == (2, ("recurrent", "recurrent"))
  assert small("hawk").block_types == ("recurrent",) * 4
  assert small("mqa").block_types == ("global_attention",) * 4
  assert set(BLOCK_TYPES) == {"recurrent", "local_attention", "global_attention"}


# ----------------------------------------------------------------------- layers vs float64


def _np_attention(q, k, v, seg, window):
  """Naive T x T float64 reference: causal, same segment, t - s <= window."""
  B, T, H, K = q.shape
  logits = np.einsum("bthk,bsk->bhts", q, k) / np.sqrt(K)
  t = np.arange(T)
  mask = (t[:, None] >= t[None]) & (seg[:, None, :, None] == seg[:, None, None, :])
  if window is not None:
    mask = mask & (t[:, None] - t[None] <= window)
  logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bsk->bthk", p, v)


# T = 600 > attention.CAUSAL_CHUNK: the causal strip path (3 query chunks, the last one short).
@pytest.mark.parametrize("T,window", [(23, 5), (24, 6), (7, 10), (16, None), (600, None),
                                      (600, 599)])
def test_blockwise_attention_matches_naive_float64(T, window):
  rng = np.random.default_rng(0)
  B, H, K = 2, 3, 8
  q, k, v = (rng.normal(size=s) for s in ((B, T, H, K), (B, T, K), (B, T, K)))
  seg = np.ones((B, T), np.int32)
  seg[1, T // 3:] = 2
  seg[1, 2 * T // 3:] = 3
  fn = jax.jit(attention.blockwise_attention, static_argnums=4)
  got = fn(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), jnp.asarray(seg), window)
  np.testing.assert_allclose(np.asarray(got), _np_attention(q, k, v, seg, window), atol=2e-5)


def test_causal_strip_attention_gradients_match_full_mask():
  """The strip path's gradients equal those of one masked T x T softmax (float32, packed rows)."""
  B, T, H, K = 1, 300, 2, 4
  ks = jax.random.split(jax.random.key(5), 4)
  q, k, v = (jax.random.normal(kk, s) for kk, s in zip(ks, ((B, T, H, K), (B, T, K), (B, T, K))))
  seg = jnp.asarray(np.repeat([1, 2], [170, 130])[None], jnp.int32)
  w = jax.random.normal(ks[3], (B, T, H, K))

  def full(q, k, v):
    t = jnp.arange(T)
    mask = (t[:, None] >= t[None]) & (seg[:, None, :, None] == seg[:, None, None, :])
    logits = jnp.where(mask, jnp.einsum("bthk,bsk->bhts", q, k) / np.sqrt(K), -jnp.inf)
    return jnp.einsum("bhts,bsk->bthk", jax.nn.softmax(logits, -1), v)

  assert T > attention.CAUSAL_CHUNK
  grads = [jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
           for f in (lambda q, k, v: attention.causal_strip_attention(q, k, v, seg), full)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_rglru_matches_float64_recurrence_with_resets():
  cfg = small()
  B, T, R = 2, 17, cfg.lru_width_
  x = jax.random.normal(jax.random.PRNGKey(3), (B, T, R))
  positions = np.tile(np.arange(T), (B, 1))
  positions[1, 6:] = np.arange(T - 6)
  seg = make_segments(B, T, positions=jnp.asarray(positions))
  module = rglru.RGLRU(cfg)
  variables = nn.meta.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), x, seg, None))
  p = jax.tree.map(np.float64, variables["params"])
  y, h_last = jax.jit(module.apply)(variables, x, seg, None)

  def gate(name, xx):
    w, b = p[name]["w"], p[name]["b"]
    N, I, _ = w.shape
    return 1 / (1 + np.exp(-(np.einsum("btni,nij->btnj", xx.reshape(B, T, N, I), w) + b)))

  xx = np.asarray(x, np.float64)
  r, i = gate("a_gate", xx).reshape(B, T, R), gate("input_gate", xx).reshape(B, T, R)
  a = np.exp(-8.0 * r * np.log1p(np.exp(p["a_param"])))
  h = np.zeros((B, R))
  ref = np.zeros((B, T, R))
  for t in range(T):
    start = (positions[:, t] == 0)[:, None]
    norm = np.where(start, 1.0, np.sqrt(1 - a[:, t] ** 2))
    h = np.where(start, 0.0, a[:, t] * h) + norm * i[:, t] * xx[:, t]
    ref[:, t] = h
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(h_last), ref[:, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["cpu_per_block", "einsum"])
def test_block_diagonal_gates_values_and_gradients_match_float64(impl):
  """Both gate forms (CPU per-block matmuls, accelerator einsum) against float64 numpy."""
  B, T, N, I = 2, 5, 3, 4
  rng = np.random.default_rng(0)
  x, cx, ca = (rng.normal(size=(B, T, N * I)) for _ in range(3))
  w_x, w_a = rng.normal(size=(N, I, I)), rng.normal(size=(N, I, I))
  b_x, b_a = rng.normal(size=(N, I)), rng.normal(size=(N, I))
  fn = {"cpu_per_block": rglru._gates_per_block, "einsum": rglru._gates_einsum}[impl]

  def loss(x, w_x, b_x, w_a, b_a):
    gx, ga = fn(x, w_x, b_x, w_a, b_a)
    return jnp.sum(gx * cx) + jnp.sum(ga * ca), (gx, ga)

  f32 = [jnp.asarray(v, jnp.float32) for v in (x, w_x, b_x, w_a, b_a)]
  grads, (gx, ga) = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(*f32)
  xb, cxb, cab = (v.reshape(B * T, N, I) for v in (x, cx, ca))
  want_gx = np.einsum("mni,nij->mnj", xb, w_x) + b_x
  want_ga = np.einsum("mni,nij->mnj", xb, w_a) + b_a
  want_dx = np.einsum("mnj,nij->mni", cxb, w_x) + np.einsum("mnj,nij->mni", cab, w_a)
  want = [want_dx.reshape(x.shape), np.einsum("mni,mnj->nij", xb, cxb), cxb.sum(0),
          np.einsum("mni,mnj->nij", xb, cab), cab.sum(0)]
  np.testing.assert_allclose(gx, want_gx.reshape(x.shape), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ga, want_ga.reshape(x.shape), rtol=1e-5, atol=1e-5)
  for got, expected in zip(grads, want):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_sqrt_gradient_is_clipped_at_1000():
  g = jax.grad(lambda x: rglru.sqrt_bound_derivative(x, 1000.0))
  assert float(g(0.0)) == pytest.approx(1000.0)
  assert float(g(0.25)) == pytest.approx(1.0)  # 1 / (2 sqrt(0.25)), unclipped


@pytest.mark.parametrize("kind,lo,hi,power", [("code", 0.9, 0.999, 1), ("paper", 0.9, 0.999, 8)])
def test_lambda_init_ranges(kind, lo, hi, power):
  lam = rglru.lambda_initializer(kind)(jax.random.PRNGKey(0), (20000,))
  a_pow = np.exp(-power * np.log1p(np.exp(np.asarray(lam, np.float64))))
  assert a_pow.min() >= lo - 1e-6 and a_pow.max() <= hi + 1e-6
  # Spread over the whole interval, not collapsed at one end.
  assert a_pow.min() < lo + 0.01 and a_pow.max() > hi - 0.001


def test_rope_preserves_norms_and_relative_positions():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  rot = lambda x, p: attention.apply_rope(x, jnp.array([[p]]), 8, 10_000.0)  # noqa: E731
  # Scores depend only on the distance; the un-rotated half passes through.
  s1 = float(jnp.sum(rot(q, 7) * rot(k, 3)))
  s2 = float(jnp.sum(rot(q, 104) * rot(k, 100)))
  assert s1 == pytest.approx(s2, rel=1e-4)
  np.testing.assert_array_equal(np.asarray(rot(q, 5))[..., 8:], np.asarray(q)[..., 8:])
  assert float(jnp.linalg.norm(rot(q, 5))) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)


# ------------------------------------------------------------------------- whole model


FAMILIES = ("griffin", "hawk", "mqa")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_equals_documents_alone(family):
  cfg = small(family, logits_soft_cap=30.0)
  params = _perturbed_params(cfg)
  lengths = (9, 13, 6)  # longer than the window (5), and a document shorter than it
  T = sum(lengths) + 3  # trailing padding
  docs = _tokens(len(lengths), max(lengths), seed=10)
  row = jnp.concatenate([docs[i, :n] for i, n in enumerate(lengths)]
                        + [jnp.zeros((3,), jnp.int32)])[None]
  seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(3)])
  pos = np.concatenate([np.arange(n) for n in lengths] + [np.arange(3)])
  packed = apply(params, cfg, row, segment_ids=jnp.asarray(seg[None], jnp.int32),
                 positions=jnp.asarray(pos[None], jnp.int32))
  assert packed.shape == (1, T, cfg.vocab_size) and packed.dtype == jnp.float32
  # Each document alone in its own row: a causal model never sees the tail after it.
  alone = apply(params, cfg, docs)
  start = 0
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(np.asarray(packed[0, start:start + n]), np.asarray(alone[i, :n]),
                               rtol=1e-5, atol=1e-5)
    start += n


def test_segment_ids_alone_imply_positions():
  cfg = small()
  params = _perturbed_params(cfg)
  tokens = _tokens(2, 14)
  seg = jnp.asarray(np.repeat([[1, 2], [1, 1]], 7, axis=1), jnp.int32)
  pos = jnp.asarray([list(range(7)) * 2, list(range(14))], jnp.int32)
  np.testing.assert_allclose(np.asarray(apply(params, cfg, tokens, segment_ids=seg)),
                             np.asarray(apply(params, cfg, tokens, segment_ids=seg, positions=pos)),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_with_cache_reproduces_full_sequence(family):
  cfg = small(family, logits_soft_cap=30.0)  # a scanned group and a remainder block
  params = _perturbed_params(cfg)
  T = 17  # > window (5) so the ring buffer wraps several times
  tokens = _tokens(2, T)
  full = np.asarray(jax.jit(lambda p, t: apply(p, cfg, t))(params, tokens))
  step = jax.jit(lambda p, t, c: decode(p, cfg, t, c))
  # A 4-token prefill chunk, then single tokens, then a 3-token chunk.
  cache = init_cache(cfg, batch_size=2, max_length=T)
  pieces, start = [], 0
  for n in [4] + [1] * 10 + [3]:
    logits, cache = step(params, tokens[:, start:start + n], cache)
    pieces.append(np.asarray(logits))
    start += n
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full[:, :start], rtol=1e-5,
                             atol=1e-5)
  assert np.asarray(cache["num_tokens"]).tolist() == [start, start]


def test_scan_unrolled_and_remat_variants_agree():
  cfg = small(num_layers=4)  # one scanned group and a one-block remainder
  params = _perturbed_params(cfg)
  tokens = _tokens(2, 12)
  targets = _tokens(2, 12, seed=7)

  def loss(p, c):
    logp = jax.nn.log_softmax(apply(p, c, tokens))
    return -jnp.take_along_axis(logp, targets[..., None], -1).mean()

  ref_logits = np.asarray(apply(params, cfg, tokens))
  # Unrolling the layer loop: same parameters, same function.
  np.testing.assert_allclose(np.asarray(apply(params, cfg.replace(scan_layers=False), tokens)),
                             ref_logits, rtol=1e-5, atol=1e-5)
  # Rematerialisation only changes the backward pass.
  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  ref_loss, ref_grad = grad_fn(params, cfg)
  value, grad = grad_fn(params, cfg.replace(remat="dots"))
  assert float(value) == pytest.approx(float(ref_loss), rel=1e-5)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradients_finite(family, dtype):
  cfg = small(family, dtype=dtype, logits_soft_cap=30.0, embeddings_scale_by_sqrt_dim=True,
              num_layers=3, remat="block")
  params = _perturbed_params(cfg)
  tokens = _tokens(2, 16)
  segs = jnp.asarray(np.repeat([[1, 2]], 8, axis=1).repeat(2, 0), jnp.int32)

  def loss(p):
    logits = apply(p, cfg, tokens, segment_ids=segs)
    assert logits.dtype == jnp.float32
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1).mean()

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value))
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  # Every parameter receives gradient (nothing is accidentally disconnected).
  assert all(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_param_logical_axes_cover_every_parameter():
  cfg = small(num_layers=4)
  params = _perturbed_params(cfg)
  axes = param_logical_axes(cfg)
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_a = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  assert len(flat_p) == len(flat_a)
  for (path, p), a in zip(flat_p, flat_a):
    assert len(a) == p.ndim, (path, a, p.shape)
    assert set(a) <= LOGICAL_NAMES, (path, a)
    stacked = "groups" in jax.tree_util.keystr(path)
    assert (a[0] == "layers") == stacked, (path, a)
  assert axes["embedder"]["input_embedding"] == ("vocab", "embed")
  assert axes["groups"]["block_0"]["recurrent_block"]["rg_lru"]["a_gate"]["w"] == (
      "layers", "rnn_block", None, None)


def test_init_is_eval_shape_friendly_and_uses_param_dtype():
  cfg = small(param_dtype="float32", dtype="bfloat16")
  shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0))
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))
  stacked = shapes["groups"]["block_2"]["attention_block"]["q_w"]
  assert stacked.shape == (cfg.num_groups, cfg.width, cfg.num_heads, cfg.head_dim_)


def test_apply_rejects_bad_shapes_before_compiling():
  cfg = small()
  params = _perturbed_params(cfg)
  with pytest.raises(ValueError, match=r"tokens must be \[batch, time\]"):
    apply(params, cfg, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids must have the tokens' shape"):
    apply(params, cfg, jnp.zeros((2, 4), jnp.int32), segment_ids=jnp.ones((2, 5), jnp.int32))


def test_modelconfig_is_hashable_and_frozen():
  cfg = small()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.width = 3  # type: ignore[misc]
  assert hash(cfg) == hash(small())


# ------------------------------------------- hand-written backward passes vs float64 numpy


def _fd_vjp(fn, args, cotangents, eps=1e-6):
  """Cotangent-weighted central differences of a float64 NumPy function, one array per input."""
  def weighted(*a):
    return sum(np.sum(o * c) for o, c in zip(fn(*a), cotangents))

  grads = []
  for i, arg in enumerate(args):
    g = np.zeros_like(arg)
    for idx in np.ndindex(arg.shape):
      plus, minus = list(args), list(args)
      plus[i], minus[i] = arg.copy(), arg.copy()
      plus[i][idx] += eps
      minus[i][idx] -= eps
      g[idx] = (weighted(*plus) - weighted(*minus)) / (2 * eps)
    grads.append(g)
  return grads


def _check_vjp(jax_fn, np_fn, args, cotangents, rtol=1e-5, atol=1e-6):
  """Values and gradients of a float32 JAX function against float64 NumPy and central differences."""
  f32 = [jnp.asarray(a, jnp.float32) for a in args]
  outs, vjp = jax.vjp(jax_fn, *f32)
  outs = outs if isinstance(outs, tuple) else (outs,)
  want = np_fn(*args)
  for got, expected in zip(outs, want):
    np.testing.assert_allclose(np.asarray(got), expected, rtol=rtol, atol=atol)
  cot = tuple(jnp.asarray(c, jnp.float32) for c in cotangents)
  grads = vjp(cot if len(cot) > 1 else cot[0])
  for got, expected in zip(grads, _fd_vjp(np_fn, args, cotangents)):
    np.testing.assert_allclose(np.asarray(got), expected, rtol=rtol, atol=atol)


def test_causal_conv1d_values_and_gradients_match_float64():
  B, T, R, W = 2, 7, 3, 4
  rng = np.random.default_rng(4)
  x, cot = rng.normal(size=(B, T, R)), rng.normal(size=(B, T, R))
  w, b = rng.normal(size=(W, R)), rng.normal(size=(R,))
  doc = np.ones((B, T), np.int32)
  doc[1, 3:] = 2  # a document starts at t = 3 in row 1
  doc[1, 5:] = 3

  def np_fn(x, w, b):
    out = np.tile(b, (B, T, 1))
    for bb in range(B):
      for t in range(T):
        for j in range(W):
          if t - j >= 0 and doc[bb, t - j] == doc[bb, t]:
            out[bb, t] += x[bb, t - j] * w[W - 1 - j]
    return (out,)

  _check_vjp(lambda x, w, b: rglru.causal_conv1d(x, w, b, jnp.asarray(doc)), np_fn, [x, w, b],
             [cot])


def test_strip_attend_values_and_gradients_match_float64():
  B, C, H, K, S = 1, 3, 2, 4, 5
  rng = np.random.default_rng(5)
  q, k, v = rng.normal(size=(B, C, H, K)), rng.normal(size=(B, S, K)), rng.normal(size=(B, S, K))
  cot = rng.normal(size=(B, C, H, K))
  t = np.arange(S)
  mask = (t[2:, None] >= t[None]) & (t[None] != 1)  # queries 2..4; key 1 in another document
  mask = mask[None, :, None]  # [B, C, 1, S]

  def np_fn(q, k, v):
    logits = np.where(mask, np.einsum("bthk,bsk->bths", q, k) / np.sqrt(K), -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (np.einsum("bths,bsk->bthk", p / p.sum(-1, keepdims=True), v),)

  _check_vjp(lambda q, k, v: attention.strip_attend(q, k, v, jnp.asarray(mask)), np_fn,
             [q, k, v], [cot])


def test_rms_norm_values_and_gradients_match_float64():
  rng = np.random.default_rng(6)
  x, cot = 3 * rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 3, 8))
  scale = 0.1 * rng.normal(size=(8,))

  def np_fn(x, scale):
    return (x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * (scale + 1),)

  _check_vjp(lambda x, scale: layers.rms_norm(x, scale, 1e-6), np_fn, [x, scale], [cot])
