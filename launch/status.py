"""Show a launched run: phase, retries, each process's heartbeat, recent events.

  python -m launch.status --workdir=DIR_OR_GS_URL
"""

from absl import flags

from launch import jobs

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> int:
  del argv  # cli.run rejects positional arguments and reports a missing run directory (exit 2).
  return jobs.status(_WORKDIR.value)


def run() -> None:
  """Console-script entry point (`rg-launch-status`)."""
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, __doc__)


if __name__ == "__main__":
  run()
