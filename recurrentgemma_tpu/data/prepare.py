r"""Prepares (or checks) the tokenizer and stores of a config ahead of a job, and describes them.

  python -m recurrentgemma_tpu.data.prepare --config=configs/tiny.py [--config.data.cache_dir=DIR]
      [--workers=8 --config.data.sources.default.num_shards=8] [--show_rows=1]

Training prepares whatever is missing on its own; running this first (on each host, or once on a
machine whose cache directory is then copied) moves the one-time work out of the job's start-up
and shows what the model will see. It also registers the sources as seqio Tasks (and a Mixture when
there are several) for seqio's own tools; training never reads them, so its start skips that.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from recurrentgemma_tpu.data.config import DataConfig, data_config_from
from recurrentgemma_tpu.data.pipeline import Pipeline, make_pipeline


def register_seqio(pipeline: Pipeline) -> tuple[list[str], str | None]:
  """Registers the prepared sources as seqio Tasks, and a Mixture with their rates when there are
  several; returns (task names, mixture name or None)."""
  from recurrentgemma_tpu.data import tasks  # pylint: disable=g-import-not-at-top (TensorFlow)

  cfg = pipeline.config
  names = [tasks.ensure_task(s, st.key, pipeline.vocab) for s, st in zip(cfg.sources, pipeline.stores)]
  mixture = tasks.register_mixture(cfg, names) if len(cfg.sources) > 1 else None
  return names, mixture


def describe(pipeline: Pipeline, show_rows: int = 0) -> dict[str, Any]:
  """Per-source rows and tokens, the seqio names, the tokenizer, and optionally the decoded start
  of step 0."""
  cfg = pipeline.config
  task_names, mixture_name = register_seqio(pipeline)
  out: dict[str, Any] = {
      "tokenizer": pipeline.vocab.path, "tokenizer_pieces": pipeline.vocab.size,
      "seq_len": cfg.seq_len, "global_batch_size": cfg.global_batch_size,
      "steps_per_epoch": pipeline.num_train_rows / cfg.global_batch_size,
      "task_names": task_names, "mixture_name": mixture_name, "sources": {},
  }
  for source, st in zip(cfg.sources, pipeline.stores):
    entry = {"stores": st.paths, "rate": source.rate}
    rows, tokens = st.count("rows"), st.count("tokens")
    for split in rows:
      entry[split] = {"rows": rows[split], "tokens": tokens[split],
                      "fill": round(tokens[split] / max(1, rows[split] * cfg.seq_len), 4)}
    out["sources"][source.name] = entry
  if show_rows:
    batch = pipeline.batch(0, rows=slice(0, min(show_rows, cfg.global_batch_size)))
    out["step0_rows"] = [pipeline.vocab.decode(t[w > 0][:200])
                         for t, w in zip(batch["targets"], batch["loss_weights"])]
  return out


def prepare_parallel(cfg: DataConfig, workers: int) -> Pipeline:
  """Prepares with `workers` local processes (this one included); they split the shards.

  Each helper runs `make_pipeline` too: the store's try-locks hand every process different
  shards, so a source with num_shards >= workers is prepared about `workers` times faster.
  """
  if workers < 1:
    raise ValueError(f"workers={workers}; it must be >= 1.")
  import multiprocessing  # pylint: disable=g-import-not-at-top

  ctx = multiprocessing.get_context("spawn")  # no forked TensorFlow state
  helpers = [ctx.Process(target=_prepare_only, args=(cfg,)) for _ in range(workers - 1)]
  for h in helpers:
    h.start()
  try:
    pipeline = make_pipeline(cfg, process_index=0, process_count=1)
  finally:
    for h in helpers:
      h.join()
  failed = [h.exitcode for h in helpers if h.exitcode != 0]
  if failed:
    raise RuntimeError(f"{len(failed)} preparation helper(s) failed (exit codes {failed}); "
                       "their errors are in the log above.")
  return pipeline


def _prepare_only(cfg: DataConfig) -> None:
  make_pipeline(cfg, process_index=0, process_count=1)


def run() -> None:
  """Command-line entry point; flags are defined here so importing `describe` defines none."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top

  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Experiment config: configs/NAME.py[:ARG] or a preset's NAME.",
      lock_config=True)
  show_rows = flags.DEFINE_integer("show_rows", 0, "Decode the start of this many rows of step 0.")
  workers = flags.DEFINE_integer("workers", 1, "Local processes preparing shards in parallel.")
  flags.mark_flags_as_required(["config"])

  def main(argv) -> None:
    del argv
    pipeline = prepare_parallel(data_config_from(cli.load_config_flag(config_flag)), workers.value)
    print(json.dumps(describe(pipeline, show_rows.value), indent=1, ensure_ascii=False))

  cli.run(main, __doc__)


if __name__ == "__main__":
  run()
