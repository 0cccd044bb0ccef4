"""Show a launched run: phase, retries, each process's heartbeat, recent events.

  python -m launch.status --workdir=DIR_OR_GS_URL
"""

import sys

from absl import app
from absl import flags

from launch import jobs

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    return jobs.status(_WORKDIR.value)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def run() -> None:
  """Console-script entry point (`rg-launch-status`)."""
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, __doc__)


if __name__ == "__main__":
  run()
