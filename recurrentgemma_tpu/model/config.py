"""`ModelConfig`: the one typed, validated description of a Griffin / Hawk / MQA model.

The config file's `config.model` ConfigDict is converted here and nowhere else; model code only
ever sees this frozen dataclass. Every check names the field and the values it accepts, and runs
before anything is traced or compiled.
"""

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp

import pallas_kernels
from recurrentgemma_tpu import strict

RECURRENT = "recurrent"
LOCAL_ATTENTION = "local_attention"
GLOBAL_ATTENTION = "global_attention"
BLOCK_TYPES = (RECURRENT, LOCAL_ATTENTION, GLOBAL_ATTENTION)

# Shorthands accepted for `block_pattern`: the three families of the Griffin paper.
FAMILY_PATTERNS = {
    "griffin": (RECURRENT, RECURRENT, LOCAL_ATTENTION),
    "hawk": (RECURRENT,),
    "mqa": (GLOBAL_ATTENTION,),
}

LAMBDA_INITS = ("code", "paper")
REMAT_POLICIES = ("none", "block", "dots", "dots_no_batch")
SCAN_IMPLS = pallas_kernels.IMPLS
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_block_pattern(pattern: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
  """Turns 'griffin' / 'recurrent,recurrent,local_attention' / a tuple into block types."""
  if isinstance(pattern, str):
    if pattern in FAMILY_PATTERNS:
      return FAMILY_PATTERNS[pattern]
    parts = tuple(p.strip() for p in pattern.split(",") if p.strip())
  else:
    parts = tuple(pattern)
  if not parts:
    raise ValueError(f"block_pattern={pattern!r} is empty; give a family {tuple(FAMILY_PATTERNS)} "
                     f"or a comma-separated list of {BLOCK_TYPES}")
  for p in parts:
    if p not in BLOCK_TYPES:
      raise ValueError(f"block_pattern={pattern!r} contains {p!r}; each entry must be one of "
                       f"{BLOCK_TYPES} (or the whole pattern one of {tuple(FAMILY_PATTERNS)})")
  return parts


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of one model (configs/base.py declares each field and its default)."""

  vocab_size: int
  width: int
  num_layers: int
  block_pattern: tuple[str, ...]
  mlp_expansion: int
  num_heads: int
  head_dim: int  # 0: width // num_heads, as in the reference code
  lru_width: int  # 0: width
  num_gate_blocks: int  # 0: num_heads, as in the reference code (the paper uses 16)
  conv_width: int
  attention_window: int
  logits_soft_cap: float
  embeddings_scale_by_sqrt_dim: bool
  lambda_init: str
  rope_fraction: float
  rope_base: float
  dtype: str
  param_dtype: str
  scan_layers: bool
  remat: str
  scan_impl: str

  def __post_init__(self):
    # Normalise the pattern first so a list or a family name is accepted everywhere.
    object.__setattr__(self, "block_pattern", parse_block_pattern(self.block_pattern))
    for name in ("vocab_size", "width", "num_layers", "mlp_expansion", "num_heads", "conv_width",
                 "attention_window"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    for name in ("head_dim", "lru_width", "num_gate_blocks"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer (0 = derived default)")
    if self.head_dim == 0 and self.width % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide width={self.width} when head_dim=0 "
                       f"(head_dim defaults to width // num_heads); or set head_dim explicitly")
    if self.head_dim_ % 2:
      raise ValueError(f"head_dim={self.head_dim_} must be even (RoPE rotates pairs)")
    rope_dims = self.head_dim_ * self.rope_fraction
    if not 0.0 <= self.rope_fraction <= 1.0 or rope_dims != int(rope_dims) or int(rope_dims) % 2:
      raise ValueError(f"rope_fraction={self.rope_fraction} must be in [0, 1] and make "
                       f"head_dim * rope_fraction = {rope_dims} an even integer "
                       f"(reference code: 0.5; full RoPE: 1.0)")
    if self.rope_base <= 0:
      raise ValueError(f"rope_base={self.rope_base} must be positive")
    if self.lru_width_ % 2:
      raise ValueError(f"lru_width={self.lru_width_} must be even")
    if self.lru_width_ % self.num_gate_blocks_:
      raise ValueError(f"num_gate_blocks={self.num_gate_blocks_} must divide lru_width="
                       f"{self.lru_width_} (the RG-LRU gates are block-diagonal)")
    if self.logits_soft_cap < 0:
      raise ValueError(f"logits_soft_cap={self.logits_soft_cap} must be >= 0 (0 disables it)")
    if self.lambda_init not in LAMBDA_INITS:
      raise ValueError(f"lambda_init={self.lambda_init!r} must be one of {LAMBDA_INITS}: 'code' "
                       "draws a in [0.9, 0.999] like the released code, 'paper' draws a^8 there")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r} must be one of {REMAT_POLICIES}")
    if self.scan_impl not in SCAN_IMPLS:
      raise ValueError(f"scan_impl={self.scan_impl!r} must be one of {SCAN_IMPLS}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r} must be one of {tuple(DTYPES)}")

  # Derived sizes. The trailing underscore marks "resolved" values (defaults filled in).
  @property
  def head_dim_(self) -> int:
    return self.head_dim or self.width // self.num_heads

  @property
  def lru_width_(self) -> int:
    return self.lru_width or self.width

  @property
  def num_gate_blocks_(self) -> int:
    return self.num_gate_blocks or self.num_heads

  @property
  def mlp_width(self) -> int:
    return self.mlp_expansion * self.width

  @property
  def rope_dims(self) -> int:
    return int(self.head_dim_ * self.rope_fraction)

  @property
  def block_types(self) -> tuple[str, ...]:
    """The type of each of the num_layers residual blocks: the pattern repeated and cut."""
    p = self.block_pattern
    return tuple(p[i % len(p)] for i in range(self.num_layers))

  @property
  def num_groups(self) -> int:
    """How many whole repetitions of block_pattern there are (scanned over when scan_layers)."""
    return self.num_layers // len(self.block_pattern)

  @property
  def remainder_types(self) -> tuple[str, ...]:
    """Trailing blocks that do not fill a whole pattern group."""
    return self.block_pattern[: self.num_layers % len(self.block_pattern)]

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  @property
  def parameter_dtype(self) -> Any:
    return DTYPES[self.param_dtype]

  @property
  def final_w_init_variance_scale(self) -> float:
    # The reference code scales every block's output projection by 2 / num_layers.
    return 2.0 / self.num_layers

  @property
  def embed_scale(self) -> float:
    return math.sqrt(self.width)

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
    """Builds a ModelConfig from `config.model` (a ConfigDict or a plain mapping of every field).

    Unknown or missing fields are an error (configs/base.py declares every field, with its default),
    so a typo in a preset or on the command line cannot pass silently.
    """
    return strict.typed(cls, cfg, "config.model")
