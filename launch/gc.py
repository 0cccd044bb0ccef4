"""Delete this run's queued resources / JobSets that no live attempt uses (leaked, finished, failed).

  python -m launch.gc --workdir=DIR_OR_GS_URL [--dry_run]
"""

from absl import flags

from launch import jobs

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List, and print the deletions instead of running them.")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> int:
  del argv  # cli.run rejects positional arguments and reports a missing run directory (exit 2).
  return jobs.gc(_WORKDIR.value, dry_run=_DRY_RUN.value)


def run() -> None:
  """Console-script entry point (`rg-launch-gc`)."""
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, __doc__)


if __name__ == "__main__":
  run()
