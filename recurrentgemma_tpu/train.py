r"""The main job: train (or resume) a model from a config file.

  python -m recurrentgemma_tpu.train --config=configs/tiny.py --workdir=workdirs/tiny \
      [--config.train.steps=2000 ...] [--init_from=PATH]

Re-running the same command resumes from the newest checkpoint in the workdir. On a TPU pod the same
command runs on every host; several local processes join with --coordinator_address,
--num_processes and --process_id (CPU processes then talk over gloo).
"""

import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from recurrentgemma_tpu import distributed

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


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; config overrides are --config.GROUP.KEY=VALUE.")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Imported after flag parsing so `--help` and flag errors are instant.
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import trainer  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  if _INIT_FROM.value is not None:
    config.checkpoint.init_from = _INIT_FROM.value
  _maybe_initialize_distributed()
  result = trainer.train_and_evaluate(experiment_lib.build(config), _WORKDIR.value)
  logging.info("Training %s at step %d; final eval %s.", result.status, result.step, result.eval)


def run() -> None:
  """Console-script entry point (`rg-train`)."""
  app.run(main)


if __name__ == "__main__":
  run()
