r"""Exports a training workdir's checkpoint as a Hugging Face transformers RecurrentGemma checkpoint.

  python -m recurrentgemma_tpu.checkpoints.export_hf --workdir=workdirs/run --output=hf/run \
      [--step=N] [--dtype=bfloat16|float32]

Writes sharded safetensors, config.json, generation_config.json, the run's tokenizer and
export_manifest.json (the logits check's figures and a sha256 per tensor), so that
`AutoModelForCausalLM.from_pretrained(OUTPUT)` and `AutoTokenizer.from_pretrained(OUTPUT)` load it
without remote code. Only exact rewrites are applied; a model transformers cannot express exactly
is refused (exit 2) with a report of each field. Before anything appears at OUTPUT, the written files
are loaded back and run against this project's model on CPU in float32 on two sequences longer
than the attention window; the export is refused if their logits differ. OUTPUT may be a gs:// URL
(files are uploaded, manifest last). Needs the hf extra (torch, transformers, safetensors).
"""

from typing import Any

from absl import flags
import numpy as np

from recurrentgemma_tpu import workdir as workdir_lib
from recurrentgemma_tpu.checkpoints import hf_bridge

def export(workdir: str, output: str, *, step: int | None = None, dtype: str = "float32",
           max_shard_bytes: int = hf_bridge.SHARD_BYTES, log: Any = print) -> dict[str, Any]:
  """Exports step `step` (newest if None) of `workdir` to `output`; returns the manifest.

  Every request error is a one-line exit_codes.UserError, raised before any array is read.
  """
  step = hf_bridge.check_export_args(workdir, output, step, dtype)
  import jax  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu.checkpoints import manager  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  exp = experiment_lib.from_workdir(workdir, single_host=True)
  vocab = vocab_lib.Vocabulary(vocab_lib.existing_tokenizer_path(exp.data), exp.model.vocab_size)
  step_dir = workdir_lib.join(workdir, workdir_lib.CHECKPOINT_DIR, str(step))
  abstract = jax.eval_shape(lambda: model_lib.init_params(exp.model, jax.random.key(0)))
  params = jax.tree.map(np.asarray, manager.load_params(step_dir, abstract))
  source = {"workdir": workdir_lib.resolve(workdir), "step": step,
            "config_sha256": exp.fingerprint()}
  return hf_bridge.export_params(params, exp.model, vocab, output, source=source, dtype=dtype,
                                 max_shard_bytes=max_shard_bytes, log=log)


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  manifest = export(f.workdir, f.output, step=f.step, dtype=f.dtype)
  check = manifest["logits_check"]
  print(f"wrote {f.output} (step {manifest['source']['step']}, {manifest['dtype']}, "
        f"{len(manifest['tensors'])} tensors); logits agree with transformers to "
        f"{check['relative_error']:.2g} relative on {check['sequences']} x "
        f"{check['tokens_per_sequence']} tokens")


def run() -> None:
  # Flags are defined here, not at import, so this module's functions can be imported next to
  # other commands' flags (sample.py also defines --workdir).
  flags.DEFINE_string("workdir", None, "Training workdir to export from.")
  flags.DEFINE_string("output", None, "New or empty directory (local or gs://).")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored tensor dtype.")
  flags.mark_flags_as_required(["workdir", "output"])
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, __doc__)


if __name__ == "__main__":
  run()
