"""Show a launched run: phase, retries, each process's heartbeat, recent events.

  python -m launch.status --workdir=DIR_OR_GS_URL [--goodput]

--goodput adds the run's goodput ledger: its wall-clock time since submission split into productive
steps, queueing, start-up, compile, waiting for data, checkpoint saves, evaluations and work lost
(docs/operations.md, "Goodput").
"""

from absl import flags

from launch import jobs

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
_GOODPUT = flags.DEFINE_bool("goodput", False, "Also show where the run's wall-clock time went.")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> int:
  del argv  # cli.run rejects positional arguments and reports a missing run directory (exit 2).
  return jobs.status(_WORKDIR.value, goodput=_GOODPUT.value)


def run() -> None:
  """Console-script entry point (`rg-launch-status`)."""
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, __doc__)


if __name__ == "__main__":
  run()
