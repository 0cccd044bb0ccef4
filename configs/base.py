"""Every config field, declared and commented once; presets override a few.

Each group is built by its own function so the concerns stay separate:
`model`, `data`, `optimizer`, `train`, `checkpoint`, `mesh`.
"""

import ml_collections


def model() -> ml_collections.ConfigDict:
  """Model architecture (converted to recurrentgemma_tpu.model.ModelConfig)."""
  c = ml_collections.ConfigDict()
  return c


def data() -> ml_collections.ConfigDict:
  """Data pipeline (recurrentgemma_tpu/data)."""
  c = ml_collections.ConfigDict()
  return c


def optimizer() -> ml_collections.ConfigDict:
  """AdamW, schedule and clipping (recurrentgemma_tpu/train_step.py)."""
  c = ml_collections.ConfigDict()
  return c


def train() -> ml_collections.ConfigDict:
  """Training loop (recurrentgemma_tpu/train.py)."""
  c = ml_collections.ConfigDict()
  return c


def checkpoint() -> ml_collections.ConfigDict:
  """Orbax checkpointing (recurrentgemma_tpu/checkpoints)."""
  c = ml_collections.ConfigDict()
  return c


def mesh() -> ml_collections.ConfigDict:
  """Device mesh and partitioning strategy (sharding/)."""
  c = ml_collections.ConfigDict()
  return c


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model()
  config.data = data()
  config.optimizer = optimizer()
  config.train = train()
  config.checkpoint = checkpoint()
  config.mesh = mesh()
  return config
