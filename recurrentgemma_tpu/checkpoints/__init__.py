"""Checkpoints: import of the published RecurrentGemma layout (`official`, `convert` CLI) and the
Orbax training checkpoint manager (`manager`)."""

from recurrentgemma_tpu.checkpoints.official import import_official, official_to_model_config

__all__ = ["import_official", "official_to_model_config"]
