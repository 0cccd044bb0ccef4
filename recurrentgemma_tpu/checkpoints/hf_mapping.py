"""The exact mapping between this project's models and transformers' RecurrentGemma (no torch here).

What transformers' `RecurrentGemmaForCausalLM` (5.25) fixes, read from its modeling code and checked
by the tests against the installed package:

* `head_dim` is always `hidden_size // num_attention_heads`; `num_key_value_heads` must be 1 (its
  default builds multi-head attention); `intermediate_size` is twice the per-branch MLP width.
* The RG-LRU gates always have `num_attention_heads` blocks of `lru_width // heads`.
* The input embeddings are always multiplied by bfloat16(sqrt(hidden_size)) and the logits always
  soft-capped, `tanh(logits / cap) * cap`.
* A local window keeps `attention_window_size` keys (`kv > q - W`); ours keeps `window + 1`.
* There is one attention type (sliding window) besides the recurrent block.

Only rewrites that keep every logit are applied (`Rewrite`); anything else is a `Finding` that makes
the model non-expressible. `expressibility` decides, `hf_config` writes `config.json`'s fields,
`to_hf` / `from_hf` move the tensors (numpy), `model_config_from_hf` reads an HF config back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from recurrentgemma_tpu.model.config import (GLOBAL_ATTENTION, LOCAL_ATTENTION, RECURRENT,
                                             ModelConfig)

HF_PREFIX = "hf:"  # `--init_from=hf:DIR` names a transformers checkpoint directory
MODEL_TYPE = "recurrent_gemma"
ARCHITECTURE = "RecurrentGemmaForCausalLM"
HIDDEN_ACTIVATION = "gelu_pytorch_tanh"  # jax.nn.gelu's default (tanh) approximation
RMS_NORM_EPS = 1e-6
_HF_BLOCK = {RECURRENT: "recurrent", LOCAL_ATTENTION: "attention", GLOBAL_ATTENTION: "attention"}
# Global attention is written as a sliding window no sequence reaches (HF has no global type).
GLOBAL_WINDOW = 1 << 30
# transformers cycles `block_types` only up to 100 repetitions (`(block_types * 100)[:layers]`).
_HF_MAX_CYCLES = 100


class NotExpressible(ValueError):
  """The model (or checkpoint) cannot be mapped exactly; the message lists every field."""


@dataclasses.dataclass(frozen=True)
class Finding:
  """One reason HF cannot express a model exactly: the field, its value, what HF would need."""

  field: str
  value: Any
  needs: str

  def __str__(self) -> str:
    return f"{self.field}={self.value!r}: {self.needs}"


@dataclasses.dataclass(frozen=True)
class Report:
  """`expressibility`'s answer: the problems (none = exportable) and the exact rewrites applied."""

  findings: tuple[Finding, ...]
  rewrites: tuple[str, ...]

  @property
  def exportable(self) -> bool:
    return not self.findings

  def lines(self) -> list[str]:
    """A human-readable report, one field per line."""
    if self.exportable:
      return ["Hugging Face export: exact"] + [f"  rewrite: {r}" for r in self.rewrites]
    return (["Hugging Face export: not expressible exactly by transformers' RecurrentGemma"]
            + [f"  {f.field} = {f.value!r}: {f.needs}" for f in self.findings])

  def one_line(self) -> str:
    """Every finding (or rewrite) on one line."""
    if self.exportable:
      return "yes" + (f" ({'; '.join(self.rewrites)})" if self.rewrites else "")
    return "no: " + "; ".join(str(f) for f in self.findings)

  def short(self) -> str:
    """The start-up block's line: yes/no and the fields that decide."""
    if self.exportable:
      return "yes, exactly (python -m recurrentgemma_tpu.checkpoints.export_hf)"
    fields = ", ".join(f"{f.field}={f.value!r}" for f in self.findings)
    return f"no: transformers cannot express {fields} (docs/model.md, Hugging Face bridge)"


def _divisors_multiple_of(n: int, k: int) -> list[int]:
  return [d for d in range(k, n + 1, k) if n % d == 0]


def expressibility(cfg: ModelConfig, dtype: str = "float32") -> Report:
  """Which fields of `cfg` transformers' RecurrentGemma cannot express, and the rewrites it needs.

  `dtype` is the storage dtype of the export (the untied-embedding rewrite is exact only in float32).
  """
  findings: list[Finding] = []
  rewrites: list[str] = []
  D, H, R, N = cfg.width, cfg.num_heads, cfg.lru_width_, cfg.num_gate_blocks_
  types = set(cfg.block_types)
  if cfg.logits_soft_cap <= 0:
    findings.append(Finding("logits_soft_cap", cfg.logits_soft_cap,
                            "HF always applies tanh(logits / cap) * cap; needs a cap > 0 "
                            "(RecurrentGemma: 30.0)"))
  if D % H or cfg.head_dim_ != D // H:
    findings.append(Finding("head_dim", cfg.head_dim_,
                            f"HF derives head_dim = hidden_size // num_heads = {D // H}; needs "
                            f"head_dim = width / num_heads (0)"))
  if RECURRENT in types:
    if R % H:
      findings.append(Finding("lru_width", R,
                              f"HF splits the RG-LRU gates into num_heads={H} blocks; needs "
                              f"lru_width divisible by {H}"))
    elif N % H:
      valid = _divisors_multiple_of(R, H)
      findings.append(Finding("num_gate_blocks", N,
                              f"HF's RG-LRU gates have num_heads={H} blocks, exact only when "
                              f"{H} divides num_gate_blocks; needs one of {valid[:6]} "
                              f"(0 = num_heads)"))
    elif N != H:
      rewrites.append(f"gate blocks {N} -> {H} (block-diagonal, zeros off the diagonal)")
  if LOCAL_ATTENTION in types and GLOBAL_ATTENTION in types:
    findings.append(Finding("block_pattern", ",".join(cfg.block_pattern),
                            "HF has one attention window for every attention layer; needs local "
                            "or global attention, not both"))
  elif LOCAL_ATTENTION in types:
    rewrites.append(f"attention_window_size = window + 1 = {cfg.attention_window + 1} "
                    "(HF keeps W keys, this model window + 1)")
  elif GLOBAL_ATTENTION in types:
    rewrites.append(f"global attention as attention_window_size = {GLOBAL_WINDOW} "
                    "(exact for sequences shorter than that)")
  if not cfg.embeddings_scale_by_sqrt_dim:
    if dtype != "float32":
      findings.append(Finding("embeddings_scale_by_sqrt_dim", False,
                              "HF always scales the input embeddings by bf16(sqrt(width)); the "
                              "untied table E / bf16(sqrt(width)) is exact only with "
                              "--dtype=float32 (or train with the scale on)"))
    else:
      rewrites.append("untied tables: embed_tokens = E / bf16(sqrt(width)), lm_head = E "
                      "(HF always scales the input embeddings; float32 exports only)")
  return Report(tuple(findings), tuple(rewrites))


def embed_scale(width: int) -> np.float32:
  """bfloat16(sqrt(width)) as HF's `normalizer` and our embedder compute it, as float32."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (a jax dependency)
  return np.float32(np.asarray(math.sqrt(width), ml_dtypes.bfloat16))


def _hf_window(cfg: ModelConfig) -> int:
  if LOCAL_ATTENTION in cfg.block_types:
    return cfg.attention_window + 1
  if GLOBAL_ATTENTION in cfg.block_types:
    return GLOBAL_WINDOW
  return cfg.attention_window + 1  # unused by an all-recurrent model; kept meaningful


def hf_config(cfg: ModelConfig, *, pad_id: int, eos_id: int, bos_id: int, dtype: str) -> dict[str, Any]:
  """`RecurrentGemmaConfig` keyword arguments for an exportable `cfg` (see `expressibility`)."""
  report = expressibility(cfg, dtype)
  if not report.exportable:
    raise NotExpressible("; ".join(str(f) for f in report.findings))
  pattern = [_HF_BLOCK[t] for t in cfg.block_pattern]
  if cfg.num_layers > _HF_MAX_CYCLES * len(pattern):
    pattern = [_HF_BLOCK[t] for t in cfg.block_types]
  return dict(
      architectures=[ARCHITECTURE],
      model_type=MODEL_TYPE,
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.width,
      intermediate_size=2 * cfg.mlp_width,  # HF's MLP uses intermediate_size // 2 per branch
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=1,
      lru_width=cfg.lru_width_,
      attention_window_size=_hf_window(cfg),
      conv1d_width=cfg.conv_width,
      logits_soft_cap=float(cfg.logits_soft_cap),
      rms_norm_eps=RMS_NORM_EPS,
      hidden_activation=HIDDEN_ACTIVATION,
      rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_base),
                       "partial_rotary_factor": float(cfg.rope_fraction)},
      block_types=pattern,
      attention_bias=False,
      tie_word_embeddings=bool(cfg.embeddings_scale_by_sqrt_dim),
      pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=bos_id,
      dtype=dtype,
  )


# ------------------------------------------------------------------------------------ tensors


def _layer_blocks(params: Mapping[str, Any], cfg: ModelConfig) -> list[tuple[str, Mapping[str, Any]]]:
  """(block type, parameter sub-tree) of every layer, unstacking the scanned groups."""
  P, G = len(cfg.block_pattern), cfg.num_groups
  out = []
  for i, block_type in enumerate(cfg.block_types):
    if i < G * P:
      g, j = divmod(i, P)
      tree = _index(params["groups"][f"block_{j}"], g)
    else:
      tree = params["remainder"][f"block_{i - G * P}"]
    out.append((block_type, tree))
  return out


def _index(tree: Any, g: int) -> Any:
  if isinstance(tree, Mapping):
    return {k: _index(v, g) for k, v in tree.items()}
  return np.asarray(tree)[g]


def _regroup(w: np.ndarray, blocks: int) -> np.ndarray:
  """A block-diagonal gate weight [n, R/n, R/n] regrouped into `blocks` blocks, exactly.

  Raises NotExpressible when the weight has non-zero entries outside the requested blocks.
  """
  n, b, _ = w.shape
  R = n * b
  dense = np.zeros((R, R), w.dtype)
  for i in range(n):
    dense[i * b:(i + 1) * b, i * b:(i + 1) * b] = w[i]
  c = R // blocks
  out = np.stack([dense[i * c:(i + 1) * c, i * c:(i + 1) * c] for i in range(blocks)])
  back = np.zeros_like(dense)
  for i in range(blocks):
    back[i * c:(i + 1) * c, i * c:(i + 1) * c] = out[i]
  if not np.array_equal(back, dense):
    raise NotExpressible(f"RG-LRU gate weights with {n} blocks have non-zero entries outside "
                         f"{blocks} diagonal blocks, so they cannot be regrouped exactly")
  return out


def to_hf(params: Mapping[str, Any], cfg: ModelConfig, dtype: str = "float32") -> dict[str, np.ndarray]:
  """HF state dict (key -> numpy array in `dtype`) of this project's parameters; exact rewrites only."""
  report = expressibility(cfg, dtype)
  if not report.exportable:
    raise NotExpressible("; ".join(str(f) for f in report.findings))
  H, K, D = cfg.num_heads, cfg.head_dim_, cfg.width
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  out: dict[str, np.ndarray] = {}
  table = f32(params["embedder"]["input_embedding"])
  if cfg.embeddings_scale_by_sqrt_dim:
    out["model.embed_tokens.weight"] = table
  else:
    out["model.embed_tokens.weight"] = table / embed_scale(D)
    out["lm_head.weight"] = table
  out["model.final_norm.weight"] = f32(params["final_norm"]["scale"])
  for i, (block_type, p) in enumerate(_layer_blocks(params, cfg)):
    pre = f"model.layers.{i}."
    out[pre + "temporal_pre_norm.weight"] = f32(p["temporal_pre_norm"]["scale"])
    out[pre + "channel_pre_norm.weight"] = f32(p["channel_pre_norm"]["scale"])
    m = p["mlp_block"]
    up_w, up_b = f32(m["ffw_up_w"]), f32(m["ffw_up_b"])
    out[pre + "mlp_block.gate_proj.weight"] = up_w[0].T  # index 0 is the GeLU branch
    out[pre + "mlp_block.gate_proj.bias"] = up_b[0]
    out[pre + "mlp_block.up_proj.weight"] = up_w[1].T
    out[pre + "mlp_block.up_proj.bias"] = up_b[1]
    out[pre + "mlp_block.down_proj.weight"] = f32(m["ffw_down_w"]).T
    out[pre + "mlp_block.down_proj.bias"] = f32(m["ffw_down_b"])
    t = pre + "temporal_block."
    if block_type == RECURRENT:
      r = p["recurrent_block"]
      for name in ("linear_x", "linear_y", "linear_out"):
        out[t + name + ".weight"] = f32(r[name + "_w"]).T
        out[t + name + ".bias"] = f32(r[name + "_b"])
      # [W, R] -> [R, 1, W]: torch's Conv1d correlates, so w[W - 1] meets token t in both.
      out[t + "conv_1d.weight"] = f32(r["conv_1d"]["w"]).T[:, None, :]
      out[t + "conv_1d.bias"] = f32(r["conv_1d"]["b"])
      lru = r["rg_lru"]
      out[t + "rg_lru.recurrent_param"] = f32(lru["a_param"])
      for ours, theirs in (("input_gate", "input_gate"), ("a_gate", "recurrent_gate")):
        out[t + f"rg_lru.{theirs}_weight"] = _regroup(f32(lru[ours]["w"]), H)
        out[t + f"rg_lru.{theirs}_bias"] = f32(lru[ours]["b"]).reshape(H, -1)
    else:
      a = p["attention_block"]
      out[t + "q_proj.weight"] = f32(a["q_w"]).reshape(D, H * K).T
      out[t + "k_proj.weight"] = f32(a["k_w"]).T
      out[t + "v_proj.weight"] = f32(a["v_w"]).T
      out[t + "o_proj.weight"] = f32(a["out_w"]).reshape(H * K, D).T
      out[t + "o_proj.bias"] = f32(a["out_b"])
  return {k: cast(np.ascontiguousarray(v), dtype) for k, v in out.items()}


def cast(x: np.ndarray, dtype: str) -> np.ndarray:
  """numpy array in 'float32' or 'bfloat16' (ml_dtypes)."""
  if dtype == "float32":
    return np.asarray(x, np.float32)
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  return np.asarray(x, getattr(ml_dtypes, dtype))


def _need(tensors: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
  if key not in tensors:
    raise NotExpressible(f"the HF checkpoint lacks tensor {key!r}")
  x = np.asarray(tensors[key])
  if x.shape != shape:
    raise NotExpressible(f"HF tensor {key!r} has shape {x.shape}; this model needs {shape}")
  return x


def from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
  """This project's parameters (numpy, the tensors' dtype) for `cfg` from an HF state dict.

  The inverse of `to_hf`: gate blocks are regrouped to cfg's count (exactly, or NotExpressible),
  untied tables give the output table back. Raises NotExpressible naming the first mismatch.
  """
  D, H, K, F = cfg.width, cfg.num_heads, cfg.head_dim_, cfg.mlp_width
  R, W, V, N = cfg.lru_width_, cfg.conv_width, cfg.vocab_size, cfg.num_gate_blocks_
  embed = _need(tensors, "model.embed_tokens.weight", (V, D))
  if "lm_head.weight" in tensors and not np.array_equal(tensors["lm_head.weight"], embed):
    table = _need(tensors, "lm_head.weight", (V, D))
    if cfg.embeddings_scale_by_sqrt_dim:
      raise NotExpressible("the HF checkpoint has untied input and output tables; this model "
                           "(embeddings_scale_by_sqrt_dim=True) ties them")
    s = embed_scale(D)
    err = np.max(np.abs(embed.astype(np.float32) * s - table.astype(np.float32)))
    if err > 1e-6 * max(float(np.max(np.abs(table.astype(np.float32)))), 1e-30):
      raise NotExpressible(f"the HF input table is not the output table / bf16(sqrt({D})) "
                           f"(max difference {err:.3g}); this model ties them")
  else:
    table = embed
    if not cfg.embeddings_scale_by_sqrt_dim:
      raise NotExpressible("the HF checkpoint ties its tables and always scales the input "
                           "embeddings; set embeddings_scale_by_sqrt_dim=True")
  blocks = []
  for i, block_type in enumerate(cfg.block_types):
    pre = f"model.layers.{i}."
    t = pre + "temporal_block."
    g = lambda k, s: _need(tensors, k, s)  # noqa: E731
    out: dict[str, Any] = {
        "temporal_pre_norm": {"scale": g(pre + "temporal_pre_norm.weight", (D,))},
        "channel_pre_norm": {"scale": g(pre + "channel_pre_norm.weight", (D,))},
        "mlp_block": {
            "ffw_up_w": np.stack([g(pre + "mlp_block.gate_proj.weight", (F, D)).T,
                                  g(pre + "mlp_block.up_proj.weight", (F, D)).T]),
            "ffw_up_b": np.stack([g(pre + "mlp_block.gate_proj.bias", (F,)),
                                  g(pre + "mlp_block.up_proj.bias", (F,))]),
            "ffw_down_w": g(pre + "mlp_block.down_proj.weight", (D, F)).T,
            "ffw_down_b": g(pre + "mlp_block.down_proj.bias", (D,)),
        },
    }
    if block_type == RECURRENT:
      if R % H:
        raise NotExpressible(f"lru_width={R} is not divisible by num_heads={H}")
      rec = {}
      for name in ("linear_x", "linear_y"):
        rec[name + "_w"] = g(t + name + ".weight", (R, D)).T
        rec[name + "_b"] = g(t + name + ".bias", (R,))
      rec["linear_out_w"] = g(t + "linear_out.weight", (D, R)).T
      rec["linear_out_b"] = g(t + "linear_out.bias", (D,))
      rec["conv_1d"] = {"w": g(t + "conv_1d.weight", (R, 1, W))[:, 0, :].T,
                        "b": g(t + "conv_1d.bias", (R,))}
      lru = {"a_param": g(t + "rg_lru.recurrent_param", (R,))}
      for ours, theirs in (("input_gate", "input_gate"), ("a_gate", "recurrent_gate")):
        w = g(t + f"rg_lru.{theirs}_weight", (H, R // H, R // H))
        b = g(t + f"rg_lru.{theirs}_bias", (H, R // H))
        lru[ours] = {"w": _regroup(w, N), "b": b.reshape(N, R // N)}
      rec["rg_lru"] = lru
      out["recurrent_block"] = rec
    else:
      out["attention_block"] = {
          "q_w": g(t + "q_proj.weight", (H * K, D)).T.reshape(D, H, K),
          "k_w": g(t + "k_proj.weight", (K, D)).T,
          "v_w": g(t + "v_proj.weight", (K, D)).T,
          "out_w": g(t + "o_proj.weight", (D, H * K)).T.reshape(H, K, D),
          "out_b": g(t + "o_proj.bias", (D,)),
      }
    blocks.append(out)
  extra = sorted(k for k in tensors if k.startswith("model.layers.")
                 and int(k.split(".")[2]) >= cfg.num_layers)
  if extra:
    raise NotExpressible(f"the HF checkpoint has more layers than num_layers={cfg.num_layers} "
                         f"({extra[0]})")
  params: dict[str, Any] = {"embedder": {"input_embedding": table},
                            "final_norm": {"scale": _need(tensors, "model.final_norm.weight", (D,))}}
  P, G = len(cfg.block_pattern), cfg.num_groups
  if G:
    params["groups"] = {f"block_{j}": _stack([blocks[k * P + j] for k in range(G)])
                        for j in range(P)}
  if cfg.remainder_types:
    params["remainder"] = {f"block_{j}": blocks[G * P + j]
                           for j in range(len(cfg.remainder_types))}
  return _contiguous(params)


def _stack(trees: list[Any]) -> Any:
  if isinstance(trees[0], dict):
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


def _contiguous(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _contiguous(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree)


# ------------------------------------------------------------------------------------ configs


def _hf_layer_types(hf: Mapping[str, Any]) -> list[str]:
  types = list(hf.get("block_types") or ())
  if not types:
    raise NotExpressible("the HF config has no block_types")
  return [types[i % len(types)] for i in range(int(hf["num_hidden_layers"]))]


def check_hf_config(hf: Mapping[str, Any], cfg: ModelConfig) -> None:
  """Raises NotExpressible naming every field where an HF config.json and `cfg` disagree.

  Only the configuration is read (no tensors), so a bad `--init_from=hf:DIR` fails before any
  compile. Tied/untied tables and gate-block structure are checked again on the tensors.
  """
  if hf.get("model_type") != MODEL_TYPE:
    raise NotExpressible(
        f"its config.json has model_type={hf.get('model_type')!r} (architectures "
        f"{hf.get('architectures')}); only transformers' RecurrentGemma ({MODEL_TYPE!r}) imports")
  problems = []

  def expect(name: str, theirs: Any, ours: Any, field: str) -> None:
    if theirs != ours:
      problems.append(f"{name}={theirs!r} needs config.model.{field}={theirs!r} (is {ours!r})")

  expect("vocab_size", hf.get("vocab_size"), cfg.vocab_size, "vocab_size")
  expect("hidden_size", hf.get("hidden_size"), cfg.width, "width")
  expect("num_hidden_layers", hf.get("num_hidden_layers"), cfg.num_layers, "num_layers")
  expect("num_attention_heads", hf.get("num_attention_heads"), cfg.num_heads, "num_heads")
  lru = hf.get("lru_width") or hf.get("hidden_size")
  expect("lru_width", lru, cfg.lru_width_, "lru_width")
  expect("conv1d_width", hf.get("conv1d_width", 4), cfg.conv_width, "conv_width")
  inter = hf.get("intermediate_size")
  if inter != 2 * cfg.mlp_width:
    problems.append(f"intermediate_size={inter!r} needs config.model.mlp_expansion = "
                    f"intermediate_size / (2 * width) (is {cfg.mlp_expansion})")
  if cfg.width // cfg.num_heads != cfg.head_dim_:
    problems.append(f"HF head_dim is hidden_size // heads = {cfg.width // cfg.num_heads}; "
                    f"config.model.head_dim is {cfg.head_dim_}")
  kv = hf.get("num_key_value_heads") or hf.get("num_attention_heads")
  if kv != 1:
    problems.append(f"num_key_value_heads={kv!r}: this project's attention has one K/V head")
  cap = float(hf.get("logits_soft_cap") or 0.0)
  if cap != cfg.logits_soft_cap:
    problems.append(f"logits_soft_cap={cap} needs config.model.logits_soft_cap={cap} "
                    f"(is {cfg.logits_soft_cap})")
  rope = dict(hf.get("rope_parameters") or {})
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  frac = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)))
  expect("rope_theta", theta, float(cfg.rope_base), "rope_base")
  expect("partial_rotary_factor", frac, float(cfg.rope_fraction), "rope_fraction")
  if rope.get("rope_type", "default") != "default":
    problems.append(f"rope_type={rope.get('rope_type')!r}: only 'default' RoPE is supported")
  if hf.get("hidden_activation", HIDDEN_ACTIVATION) != HIDDEN_ACTIVATION:
    problems.append(f"hidden_activation={hf.get('hidden_activation')!r}: this project's MLP uses "
                    f"{HIDDEN_ACTIVATION!r}")
  if float(hf.get("rms_norm_eps", RMS_NORM_EPS)) != RMS_NORM_EPS:
    problems.append(f"rms_norm_eps={hf.get('rms_norm_eps')!r}: this project's RMSNorm uses 1e-6")
  if hf.get("attention_bias"):
    problems.append("attention_bias=True: this project's q/k/v projections have no bias")
  if hf.get("vocab_size") == cfg.vocab_size and hf.get("num_hidden_layers") == cfg.num_layers:
    theirs = [RECURRENT if t == "recurrent" else "attention" for t in _hf_layer_types(hf)]
    ours = [RECURRENT if t == RECURRENT else "attention" for t in cfg.block_types]
    if theirs != ours:
      problems.append(f"block_types {hf.get('block_types')} do not match config.model."
                      f"block_pattern={','.join(cfg.block_pattern)!r}")
  window = int(hf.get("attention_window_size", 0))
  if LOCAL_ATTENTION in cfg.block_types and window != cfg.attention_window + 1:
    problems.append(f"attention_window_size={window} (HF keeps W keys) needs config.model."
                    f"attention_window={window - 1} (is {cfg.attention_window})")
  if GLOBAL_ATTENTION in cfg.block_types and window < GLOBAL_WINDOW:
    problems.append(f"attention_window_size={window} is a local window; config.model."
                    "block_pattern has global attention")
  N = cfg.num_gate_blocks_
  if RECURRENT in cfg.block_types and N % cfg.num_heads and cfg.num_heads % N:
    problems.append(f"the HF RG-LRU gates have num_heads={cfg.num_heads} blocks; "
                    f"config.model.num_gate_blocks={N} neither divides nor is a multiple of it")
  tied = hf.get("tie_word_embeddings", True)
  if tied and not cfg.embeddings_scale_by_sqrt_dim:
    problems.append("tie_word_embeddings=True (HF scales the input embeddings) needs "
                    "config.model.embeddings_scale_by_sqrt_dim=True")
  if problems:
    raise NotExpressible("; ".join(problems))


def model_fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """The `config.model` fields that describe an HF RecurrentGemma config (for docs and messages)."""
  types = _hf_layer_types(hf)
  window = int(hf.get("attention_window_size", 2049))
  attention = GLOBAL_ATTENTION if window >= GLOBAL_WINDOW else LOCAL_ATTENTION
  pattern = [RECURRENT if t == "recurrent" else attention for t in (hf.get("block_types") or ())]
  rope = dict(hf.get("rope_parameters") or {})
  width = int(hf["hidden_size"])
  return dict(
      vocab_size=int(hf["vocab_size"]), width=width, num_layers=len(types),
      block_pattern=",".join(pattern), mlp_expansion=int(hf["intermediate_size"]) // (2 * width),
      num_heads=int(hf["num_attention_heads"]), head_dim=0,
      lru_width=int(hf.get("lru_width") or width), num_gate_blocks=0,
      conv_width=int(hf.get("conv1d_width", 4)),
      attention_window=window - 1 if attention == LOCAL_ATTENTION else 1024,
      logits_soft_cap=float(hf.get("logits_soft_cap") or 0.0),
      embeddings_scale_by_sqrt_dim=bool(hf.get("tie_word_embeddings", True)),
      rope_fraction=float(rope.get("partial_rotary_factor", 0.5)),
      rope_base=float(rope.get("rope_theta", 10_000.0)),
  )
