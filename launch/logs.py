"""Worker 0's log (--follow to keep reading until the run ends), then the first traceback of any worker.

  python -m launch.logs --workdir=DIR_OR_GS_URL [--follow] [--lines=50]
"""

from absl import flags

from launch import jobs

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
_FOLLOW = flags.DEFINE_bool("follow", False, "Keep printing new lines of worker 0 until the run ends.")
_LINES = flags.DEFINE_integer("lines", 50, "Lines of worker 0's log to show first.")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> int:
  del argv  # cli.run rejects positional arguments and reports a missing run directory (exit 2).
  return jobs.logs(_WORKDIR.value, follow=_FOLLOW.value, lines=_LINES.value)


def run() -> None:
  """Console-script entry point (`rg-launch-logs`)."""
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, __doc__)


if __name__ == "__main__":
  run()
