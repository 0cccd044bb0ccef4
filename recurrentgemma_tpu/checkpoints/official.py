"""Import of the published RecurrentGemma / Griffin parameter layout into this project's layout.

The open-source `recurrentgemma` package's Flax `Griffin` stores one sub-tree per residual block,
"blocks.0" .. "blocks.{L-1}", with names such as `mlp_block/ffw_up/w` and
`attention_block/proj_q/kernel`; its config is a `GriffinConfig` NamedTuple. This module reads
both by name only (no import of that package), and produces a `ModelConfig` plus parameters in
the layout of `recurrentgemma_tpu.model` (pattern groups stacked for the layer scan).
"""

import types
from typing import Any, Mapping

import numpy as np

from recurrentgemma_tpu.model.config import LOCAL_ATTENTION, RECURRENT, ModelConfig

_OFFICIAL_BLOCK_TYPES = {"RECURRENT": RECURRENT, "ATTENTION": LOCAL_ATTENTION}


def _block_type_name(block_type: Any) -> str:
  """TemporalBlockType enum member (or its name as a string) -> our block type."""
  name = getattr(block_type, "name", block_type)
  name = str(name).upper().split(".")[-1]
  if name not in _OFFICIAL_BLOCK_TYPES:
    raise ValueError(f"official block type {block_type!r} is not one of "
                     f"{tuple(_OFFICIAL_BLOCK_TYPES)}")
  return _OFFICIAL_BLOCK_TYPES[name]


def _shortest_period(types: tuple[str, ...]) -> tuple[str, ...]:
  """The shortest prefix p with types[i] == p[i % len(p)] (e.g. (R, R, A) for RecurrentGemma)."""
  for period in range(1, len(types) + 1):
    if all(types[i] == types[i % period] for i in range(len(types))):
      return types[:period]
  return types


def official_to_model_config(official_config: Any, **overrides: Any) -> ModelConfig:
  """Translates a recurrentgemma `GriffinConfig` (read by attribute name) into a ModelConfig."""
  get = lambda name: getattr(official_config, name)  # noqa: E731
  width = int(get("width"))
  num_heads = int(get("num_heads"))
  mlp = int(get("mlp_expanded_width"))
  if mlp % width:
    raise ValueError(f"official mlp_expanded_width={mlp} is not a multiple of width={width}; "
                     "ModelConfig.mlp_expansion must be an integer")
  types = tuple(_block_type_name(t) for t in get("block_types"))
  kwargs = dict(
      vocab_size=int(get("vocab_size")),
      width=width,
      num_layers=len(types),
      block_pattern=_shortest_period(types),
      mlp_expansion=mlp // width,
      num_heads=num_heads,
      head_dim=0,  # the reference always uses width // num_heads
      lru_width=int(get("lru_width") or width),
      num_gate_blocks=0,  # the reference ties gate blocks to heads
      conv_width=4,
      attention_window=int(get("attention_window_size")),
      logits_soft_cap=float(get("logits_soft_cap") or 0.0),
      embeddings_scale_by_sqrt_dim=bool(get("embeddings_scale_by_sqrt_dim")),
      lambda_init="code",
      rope_fraction=0.5,
      rope_base=10_000.0,
      # Numerics and compilation choices (not part of the checkpoint); override as needed.
      dtype="float32",
      param_dtype="float32",
      scan_layers=True,
      remat="none",
      scan_impl="auto",
  )
  kwargs.update(overrides)
  return ModelConfig(**kwargs)


def _need(tree: Mapping[str, Any], path: str) -> np.ndarray:
  node: Any = tree
  for key in path.split("/"):
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f"official parameters lack '{path}' (missing '{key}')")
    node = node[key]
  return np.asarray(node)


def _convert_block(p: Mapping[str, Any], block_type: str, cfg: ModelConfig) -> dict[str, Any]:
  D, F, H, K = cfg.width, cfg.mlp_width, cfg.num_heads, cfg.head_dim_
  out: dict[str, Any] = {
      "temporal_pre_norm": {"scale": _need(p, "temporal_pre_norm/scale")},
      "channel_pre_norm": {"scale": _need(p, "channel_pre_norm/scale")},
      "mlp_block": {
          "ffw_up_w": _need(p, "mlp_block/ffw_up/w"),
          "ffw_up_b": _need(p, "mlp_block/ffw_up/b").reshape(2, F),
          "ffw_down_w": _need(p, "mlp_block/ffw_down/kernel"),
          "ffw_down_b": _need(p, "mlp_block/ffw_down/bias"),
      },
  }
  if block_type == RECURRENT:
    r = "recurrent_block/"
    out["recurrent_block"] = {
        "linear_y_w": _need(p, r + "linear_y/kernel"),
        "linear_y_b": _need(p, r + "linear_y/bias"),
        "linear_x_w": _need(p, r + "linear_x/kernel"),
        "linear_x_b": _need(p, r + "linear_x/bias"),
        "linear_out_w": _need(p, r + "linear_out/kernel"),
        "linear_out_b": _need(p, r + "linear_out/bias"),
        "conv_1d": {"w": _need(p, r + "conv_1d/w"), "b": _need(p, r + "conv_1d/b")},
        "rg_lru": {
            "a_param": _need(p, r + "rg_lru/a_param"),
            "input_gate": {"w": _need(p, r + "rg_lru/input_gate/w"),
                           "b": _need(p, r + "rg_lru/input_gate/b")},
            "a_gate": {"w": _need(p, r + "rg_lru/a_gate/w"),
                       "b": _need(p, r + "rg_lru/a_gate/b")},
        },
    }
  else:
    a = "attention_block/"
    out["attention_block"] = {
        "q_w": _need(p, a + "proj_q/kernel").reshape(D, H, K),
        "k_w": _need(p, a + "proj_k/kernel"),
        "v_w": _need(p, a + "proj_v/kernel"),
        "out_w": _need(p, a + "proj_final/kernel").reshape(H, K, D),
        "out_b": _need(p, a + "proj_final/bias"),
    }
  return out


def import_official(params: Mapping[str, Any], official_config: Any,
                    **overrides: Any) -> tuple[ModelConfig, dict[str, Any]]:
  """Converts the `recurrentgemma` package's Flax Griffin parameters and config into ours.

  Args:
    params: that package's parameter tree ("blocks.i" sub-trees), optionally under "params".
    official_config: its GriffinConfig, or anything with the same attribute names.
    **overrides: ModelConfig fields to set on top (e.g. dtype="bfloat16", remat="block").

  Returns:
    (ModelConfig, params) for `recurrentgemma_tpu.model.apply`; arrays are numpy.
  """
  if "params" in params and "embedder" not in params:
    params = params["params"]
  cfg = official_to_model_config(official_config, **overrides)
  embedding = _need(params, "embedder/input_embedding")
  if embedding.shape != (cfg.vocab_size, cfg.width):
    raise ValueError(f"official embedding has shape {embedding.shape}; the config says "
                     f"(vocab_size, width)={(cfg.vocab_size, cfg.width)}")
  expected = {f"blocks.{i}" for i in range(cfg.num_layers)}
  extra = sorted(k for k in params if k.startswith("blocks.") and k not in expected)
  if extra:
    raise ValueError(f"official parameters have blocks {extra} beyond the config's "
                     f"{cfg.num_layers} block_types")
  blocks = []
  for i, block_type in enumerate(cfg.block_types):
    name = f"blocks.{i}"
    if name not in params:
      raise KeyError(f"official parameters lack '{name}' (config has {cfg.num_layers} blocks)")
    blocks.append(_convert_block(params[name], block_type, cfg))
  P, G = len(cfg.block_pattern), cfg.num_groups
  out: dict[str, Any] = {
      "embedder": {"input_embedding": embedding},
      "final_norm": {"scale": _need(params, "final_norm/scale")},
  }
  if G:
    out["groups"] = {
        f"block_{j}": _stack([blocks[g * P + j] for g in range(G)]) for j in range(P)
    }
  if cfg.remainder_types:
    out["remainder"] = {f"block_{j}": blocks[G * P + j] for j in range(len(cfg.remainder_types))}
  return cfg, out


def _stack(trees: list[dict[str, Any]]) -> dict[str, Any]:
  first = trees[0]
  if isinstance(first, dict):
    return {k: _stack([t[k] for t in trees]) for k in first}
  return np.stack(trees)


# Hyper-parameters that the parameter shapes cannot reveal, per published preset (the reference
# package's `Preset`): embedding scale, local-attention window, logit soft-cap.
OFFICIAL_PRESETS = {
    "recurrentgemma_2b": dict(embeddings_scale_by_sqrt_dim=True, attention_window_size=2048,
                              logits_soft_cap=30.0),
    "recurrentgemma_9b": dict(embeddings_scale_by_sqrt_dim=True, attention_window_size=2048,
                              logits_soft_cap=30.0),
    "griffin_paper_7b": dict(embeddings_scale_by_sqrt_dim=False, attention_window_size=1024,
                             logits_soft_cap=0.0),
    "hawk_paper_7b": dict(embeddings_scale_by_sqrt_dim=False, attention_window_size=1024,
                          logits_soft_cap=0.0),
}


def official_config_from_params(params: Mapping[str, Any], preset: str | None = None,
                                **hparams: Any) -> types.SimpleNamespace:
  """Rebuilds a GriffinConfig-like object from official parameter shapes (+ a preset's hypers).

  Shapes give vocab, width, MLP width, heads, lru_width and block types; `preset` (a key of
  OFFICIAL_PRESETS) and/or `hparams` give embeddings_scale_by_sqrt_dim, attention_window_size
  and logits_soft_cap, `hparams` winning.
  """
  if "params" in params and "embedder" not in params:
    params = params["params"]
  if preset is not None and preset not in OFFICIAL_PRESETS:
    raise ValueError(f"preset={preset!r} is not one of {tuple(OFFICIAL_PRESETS)}")
  hypers = dict(OFFICIAL_PRESETS[preset]) if preset else {}
  hypers.update({k: v for k, v in hparams.items() if v is not None})
  missing = [k for k in ("embeddings_scale_by_sqrt_dim", "attention_window_size",
                         "logits_soft_cap") if k not in hypers]
  if missing:
    raise ValueError(f"{missing} cannot be read from parameters; give a preset "
                     f"{tuple(OFFICIAL_PRESETS)} or set them explicitly")
  vocab_size, width = _need(params, "embedder/input_embedding").shape
  block_types, num_heads, lru_width = [], None, None
  i = 0
  while f"blocks.{i}" in params:
    block = params[f"blocks.{i}"]
    if "recurrent_block" in block:
      block_types.append("RECURRENT")
      num_heads, block_width, _ = _need(block, "recurrent_block/rg_lru/a_gate/w").shape
      lru_width = num_heads * block_width
    elif "attention_block" in block:
      block_types.append("ATTENTION")
      num_heads = width // _need(block, "attention_block/proj_k/kernel").shape[1]
    else:
      raise ValueError(f"blocks.{i} has neither recurrent_block nor attention_block: "
                       f"{sorted(block)}")
    i += 1
  if not block_types:
    raise ValueError("official parameters contain no 'blocks.0'")
  return types.SimpleNamespace(
      vocab_size=int(vocab_size), width=int(width),
      mlp_expanded_width=int(_need(params, "blocks.0/mlp_block/ffw_up/w").shape[-1]),
      num_heads=int(num_heads), lru_width=int(lru_width or width), block_types=tuple(block_types),
      **hypers)
