r"""The main job: train (or resume) a model from a config file.

  python -m recurrentgemma_tpu.train --config=configs/tiny.py --workdir=workdirs/tiny \
      [--config.train.steps=2000 ...] [--init_from=PATH]

Re-running the same command resumes from the newest checkpoint in the workdir. On a TPU pod the same
command runs on every host; several local processes join with --coordinator_address,
--num_processes and --process_id (CPU processes then talk over gloo).

Exit codes (recurrentgemma_tpu/exit_codes.py): 0 complete, 1 internal error, 2 user error (one line,
no traceback, before any compile), 3 NaN/Inf stop, 42 SIGTERM/preemption (restart it).
"""

# SIGTERM must end the job cleanly from the first moment, so the handler goes in before the heavy
# imports below (preemption.py imports nothing heavy).
from recurrentgemma_tpu import preemption

preemption.install()

# pylint: disable=g-import-not-at-top,wrong-import-position
import logging as std_logging
import os

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from recurrentgemma_tpu import cli
from recurrentgemma_tpu import distributed
from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: configs/NAME.py[:ARG], or a preset's NAME (tiny, "
    "griffin_1b, ...).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, logs); resumed if it has any.")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "Start from the parameters of this checkpoint or workdir (same as "
    "--config.checkpoint.init_from).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize: 'auto' does when a coordinator is given (flag or "
    "JAX_COORDINATOR_ADDRESS) or a multi-host TPU environment is detected.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_ACCEPT = flags.DEFINE_list(
    "accept_config_changes", [],
    "Config fields (dotted, wildcards allowed) that may differ from the checkpoint being resumed, "
    "e.g. optimizer.learning_rate. Without it such a change refuses to resume (exit 2).")

_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "JAX persistent compilation cache (local dir or gs://), so a restarted or resumed job loads its "
    "compiled steps instead of compiling again. Default: $RECURRENTGEMMA_TPU_COMPILATION_CACHE if set, "
    "else WORKDIR/compilation_cache (gs:// with the run on pods). Empty (--compilation_cache_dir=): off.")

flags.mark_flags_as_required(["config", "workdir"])


def _maybe_initialize_distributed() -> None:
  # The JAX_* variables the launcher sets are read in one place (recurrentgemma_tpu/distributed.py).
  distributed.initialize_from_environment(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                          mode=_DISTRIBUTED.value)


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of Orbax and seqio (a dozen lines per save) so the progress lines stand out."""

  _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}seqio{os.sep}")

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in self._NOISY)


def _load_config():
  """The parsed --config (its file is loaded lazily): errors become one UserError line."""
  return cli.load_config_flag(_CONFIG)


def _train() -> int:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Imported after flag parsing so `--help` and flag errors are instant.
  from recurrentgemma_tpu import experiment as experiment_lib
  from recurrentgemma_tpu import trainer

  config = _load_config()
  if _INIT_FROM.value is not None:
    config.checkpoint.init_from = _INIT_FROM.value
  _maybe_initialize_distributed()
  # After jax.distributed (it decides by process count), before anything is compiled.
  cache_dir = trainer.enable_compilation_cache(_COMPILATION_CACHE.value, workdir=_WORKDIR.value)
  logging.info("Compilation cache: %s", cache_dir or "off")
  try:
    exp = experiment_lib.build(config)
  except (ValueError, FileNotFoundError) as e:
    raise exit_codes.UserError(str(e)) from e
  if jax.process_index() == 0:  # what runs, where, and from which step (before the long start-up)
    state = cli.workdir_state(_WORKDIR.value, exp.train.steps, exp.init_from)
    rows = (cli.experiment_rows(exp, config_spec=flags.FLAGS["config"].serialize().partition("=")[2])
            + cli.device_rows(exp) + [("workdir", f"{workdir_lib.resolve(_WORKDIR.value)} ({state})")])
    print(cli.format_block("train", rows), flush=True)
  result = trainer.train_and_evaluate(exp, _WORKDIR.value, accept_changes=_ACCEPT.value)
  logging.info("%s", _outcome(result))
  return exit_codes.PREEMPTED if result.status == "preempted" else exit_codes.OK


def _outcome(result) -> str:
  """The run's end in words (never an internal status value)."""
  ev = ", ".join(f"{k} {result.eval[k]:.4g}" for k in ("loss", "perplexity", "accuracy")
                 if k in result.eval)
  if result.status == "preempted":
    return f"Stopped after saving step {result.step}; re-run the same command to resume."
  if result.status == "already_done":
    return (f"Training already complete at step {result.step}"
            + (f"; final eval (as recorded): {ev}." if ev else "."))
  return f"Training completed at step {result.step}; final eval: {ev}."


def main(argv: list[str]) -> int:
  del argv  # cli.run refuses positional arguments
  preemption.catch()  # from here on a SIGTERM raises Preempted, reported by cli.run (exit 42)
  return _train()


def run() -> None:
  """Console-script entry point (`rg-train`); --help prints this module's docstring and flags."""
  # Only UserError is a user error here: any other ValueError deep in training is a bug (exit 1).
  cli.run(main, __doc__, user_errors=(), codes=cli.TRAIN_EXIT_CODES_HELP)


if __name__ == "__main__":
  run()
