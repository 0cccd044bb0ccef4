r"""Prepares (or checks) the tokenizer and stores of a config ahead of a job, and describes them.

  python -m recurrentgemma_tpu.data.prepare --config=configs/tiny.py [--store=DIR_OR_GS_URL]
      [--runner=DirectRunner|DataflowRunner|FlinkRunner|SparkRunner|PortableRunner]
      [--num_workers=N] [--show_rows=2] [Beam pipeline options, e.g. --project=P --region=R
      --temp_location=gs://B/tmp]

Without --runner the stores are prepared in this process (what training does at start-up for the
local cache); with one, on Apache Beam, one work item per shard of each source
(config.data.sources.NAME.num_shards), on --num_workers workers. Either way the bytes are the
same. --store (default: config.data.store, else the local cache) may be a gs:// URL; a job then
reads its rows from there with --config.data.store=THE_SAME_URL. Flags this command does not
define are passed to Beam. It also registers the sources as seqio Tasks (and a Mixture when there
are several) for seqio's own tools; training never reads them, so its start skips that.
"""

from __future__ import annotations

import json
from typing import Any


from recurrentgemma_tpu.data import store as store_lib
from recurrentgemma_tpu.data.config import BEAM_RUNNERS, DataConfig, data_config_from
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
    entry = {"store": st.directory, "shards": source.num_shards, "rate": source.rate}
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


def prepare(cfg: DataConfig, runner: str = "", num_workers: int = 1,
            pipeline_args: tuple[str, ...] = ()) -> Pipeline:
  """Prepares every missing store of `cfg` (in this process, or on a Beam runner); returns the
  pipeline that reads them.

  Raises:
    ValueError: an unknown runner or a worker count below 1 (before any work).
  """
  if runner and runner not in BEAM_RUNNERS:
    raise ValueError(f"--runner={runner!r} is not a Beam runner this command supports; valid: "
                     f"{', '.join(BEAM_RUNNERS)}, or none (prepare in this process).")
  if num_workers < 1:
    raise ValueError(f"--num_workers={num_workers}; it must be >= 1.")
  if not runner and pipeline_args:
    raise ValueError(f"unknown flags {list(pipeline_args)}; Beam pipeline options need --runner.")
  if runner:
    from recurrentgemma_tpu.data import beam  # pylint: disable=g-import-not-at-top (the beam extra)

    beam.prepare(cfg, store_lib.root(cfg), runner, num_workers, pipeline_args)
  else:
    store_lib.prepare_all(cfg)
  return make_pipeline(cfg, process_index=0, process_count=1)


def run() -> None:
  """Command-line entry point; flags are defined here so importing `describe` defines none."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top

  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Experiment config: configs/NAME.py[:ARG] or a preset's NAME.",
      lock_config=True)
  store = flags.DEFINE_string("store", None, "Store root, a directory or gs://BUCKET/PATH "
                              "(default: config.data.store, else the local data cache).")
  runner = flags.DEFINE_string("runner", "", f"Beam runner ({', '.join(BEAM_RUNNERS)}); "
                               "empty: prepare in this process.")
  num_workers = flags.DEFINE_integer("num_workers", 1, "Beam workers (DirectRunner: processes).")
  show_rows = flags.DEFINE_integer("show_rows", 0, "Decode the start of this many rows of step 0.")
  flags.mark_flags_as_required(["config"])
  beam_args: list[str] = []

  def split(argv: list[str]) -> list[str]:
    """Keeps this command's flags for absl; the others are Beam pipeline options."""
    ours = [argv[0]]
    rest = argv[1:]
    for i, a in enumerate(rest):
      if a == "--":
        beam_args.extend(rest[i + 1:])
        break
      name = a.lstrip("-").partition("=")[0]
      known = name.split(".")[0] in flags.FLAGS or name.removeprefix("no") in flags.FLAGS
      (ours if not a.startswith("--") or known else beam_args).append(a)
    return ours

  def main(argv) -> None:
    del argv
    config = cli.load_config_flag(config_flag)
    if store.value is not None:
      with config.unlocked():
        config.data.store = store.value
    cfg = data_config_from(config)
    pipeline = prepare(cfg, runner.value, num_workers.value, tuple(beam_args))
    print(json.dumps(describe(pipeline, show_rows.value), indent=1, ensure_ascii=False))

  cli.run(main, __doc__, split=split)


if __name__ == "__main__":
  run()
