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
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from recurrentgemma_tpu import distributed
from recurrentgemma_tpu import exit_codes

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/NAME.py).", lock_config=True)
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


def _root_cause(error: BaseException) -> BaseException:
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return error


def _load_config():
  """The parsed --config (its file is loaded lazily): errors become one UserError line."""
  try:
    config = _CONFIG.value
    # A file that failed to load yields a placeholder that raises on first use: use it now.
    config.keys()
    return config
  except Exception as e:  # pylint: disable=broad-except
    cause = _root_cause(e)
    hint = ("the file must define get_config() returning a ConfigDict"
            if isinstance(cause, AttributeError) else "fix the file or the path")
    raise exit_codes.UserError(
        f"--config={flags.FLAGS['config'].serialize().partition('=')[2]} could not be loaded: "
        f"{type(cause).__name__}: {cause} ({hint}).") from e


def _train() -> int:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Imported after flag parsing so `--help` and flag errors are instant.
  from recurrentgemma_tpu import experiment as experiment_lib
  from recurrentgemma_tpu import trainer

  config = _load_config()
  if _INIT_FROM.value is not None:
    config.checkpoint.init_from = _INIT_FROM.value
  _maybe_initialize_distributed()
  try:
    exp = experiment_lib.build(config)
  except (ValueError, FileNotFoundError) as e:
    raise exit_codes.UserError(str(e)) from e
  result = trainer.train_and_evaluate(exp, _WORKDIR.value, accept_changes=_ACCEPT.value)
  logging.info("Training %s at step %d; final eval %s.", result.status, result.step, result.eval)
  return exit_codes.PREEMPTED if result.status == "preempted" else exit_codes.OK


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; config overrides are --config.GROUP.KEY=VALUE.",
          file=sys.stderr)
    sys.exit(exit_codes.USER_ERROR)
  preemption.catch()
  try:
    code = _train()
  except BaseException as e:  # pylint: disable=broad-except
    if isinstance(e, SystemExit):
      raise
    code = exit_codes.for_exception(e)
    if exit_codes.wants_traceback(e):
      traceback.print_exc()
    # One line that names what happened; the launcher and the user read this.
    print(f"{_LABELS[code]}: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
  logging.flush()
  sys.exit(code)


_LABELS = {exit_codes.USER_ERROR: "error", exit_codes.NON_FINITE: "stopped (non-finite)",
           exit_codes.PREEMPTED: "preempted", exit_codes.INTERNAL: "internal error"}


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a bad flag is a user error: one line and exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(exit_codes.USER_ERROR)
  except Exception as e:  # pylint: disable=broad-except
    # The config file is executed while the flags are parsed (a syntax error surfaces here).
    spec = next((a.partition("=")[2] for a in argv if a.startswith("--config=")), "?")
    print(f"error: --config={spec} could not be loaded: {type(e).__name__}: {e} (fix the file "
          "or the path).", file=sys.stderr)
    sys.exit(exit_codes.USER_ERROR)


def run() -> None:
  """Console-script entry point (`rg-train`)."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
