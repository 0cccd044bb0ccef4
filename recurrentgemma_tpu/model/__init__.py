"""Griffin / Hawk / MQA / RecurrentGemma models (Flax), behind a small functional API."""

from recurrentgemma_tpu.model.api import (
    Cache,
    Params,
    apply,
    decode,
    features,
    init_cache,
    init_params,
    make_segments,
    param_logical_axes,
)
from recurrentgemma_tpu.model.config import (
    BLOCK_TYPES,
    FAMILY_PATTERNS,
    GLOBAL_ATTENTION,
    LOCAL_ATTENTION,
    RECURRENT,
    ModelConfig,
)
from recurrentgemma_tpu.model.rglru import SCAN_AXES

__all__ = [
    "BLOCK_TYPES", "FAMILY_PATTERNS", "GLOBAL_ATTENTION", "LOCAL_ATTENTION", "RECURRENT",
    "SCAN_AXES", "Cache", "ModelConfig", "Params", "apply", "decode", "features", "init_cache",
    "init_params",
    "make_segments", "param_logical_axes",
]
