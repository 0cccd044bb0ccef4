"""Converts a published RecurrentGemma / Griffin Flax checkpoint into this project's format.

  python -m recurrentgemma_tpu.checkpoints.convert --input=/path/2b --output=/path/rg2b \\
      --preset=recurrentgemma_2b

Writes `<output>/params` (an Orbax parameters checkpoint that `--init_from=<output>` loads) and
`<output>/model_config.json` (the ModelConfig fields to put in a config file's `config.model`).
"""

import dataclasses
import json
import os
from typing import Any

from absl import app
from absl import flags
import orbax.checkpoint as ocp

from recurrentgemma_tpu.checkpoints import manager
from recurrentgemma_tpu.checkpoints.official import (OFFICIAL_PRESETS, import_official,
                                                     official_config_from_params)
from recurrentgemma_tpu.model import ModelConfig

def read_official(path: str) -> dict[str, Any]:
  """Reads an official checkpoint (saved with PyTreeCheckpointer) as host numpy arrays."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"input={path!r} is not a directory")
  tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(path))
  return tree["params"] if "params" in tree and "embedder" not in tree else tree


def convert(input_dir: str, output_dir: str, preset: str | None = None,
            **hparams: Any) -> ModelConfig:
  """Converts `input_dir` and writes `output_dir/params` + `output_dir/model_config.json`."""
  official = read_official(input_dir)
  official_config = official_config_from_params(official, preset, **hparams)
  config, params = import_official(official, official_config)
  os.makedirs(output_dir, exist_ok=True)
  manager.save_params(os.path.join(os.path.abspath(output_dir), manager.PARAMS_ITEM), params)
  fields = dataclasses.asdict(config)
  fields["block_pattern"] = ",".join(config.block_pattern)
  with open(os.path.join(output_dir, "model_config.json"), "w") as f:
    json.dump(fields, f, indent=2)
  return config


def main(argv: list[str]) -> None:
  del argv  # cli.run refuses positional arguments
  f = flags.FLAGS
  if not f.input or not f.output:
    raise app.UsageError("--input and --output are required")
  config = convert(f.input, f.output, f.preset, attention_window_size=f.attention_window,
                   logits_soft_cap=f.logits_soft_cap,
                   embeddings_scale_by_sqrt_dim=f.embeddings_scale_by_sqrt_dim)
  print(f"wrote {f.output}/params and model_config.json for {config}")


def run() -> None:
  # Flags are defined here rather than at import so tests and other CLIs can import convert().
  flags.DEFINE_string("input", None, "Official Orbax checkpoint directory (params).")
  flags.DEFINE_string("output", None, "Directory to write params/ and model_config.json.")
  flags.DEFINE_enum("preset", None, list(OFFICIAL_PRESETS),
                    "Published preset: supplies window, soft-cap and embedding scale.")
  flags.DEFINE_integer("attention_window", None, "Overrides the preset's window.")
  flags.DEFINE_float("logits_soft_cap", None, "Overrides the preset's soft-cap.")
  flags.DEFINE_bool("embeddings_scale_by_sqrt_dim", None, "Overrides the preset's scale.")
  flags.mark_flags_as_required(["input", "output"])
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, __doc__)


if __name__ == "__main__":
  run()
