"""Stop a run: no more restarts, the trainer gets SIGTERM (saves, exits 42), cloud resources are deleted.

  python -m launch.stop --workdir=DIR_OR_GS_URL [--dry_run]
"""

from absl import flags

from launch import jobs

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print what would be done.")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> int:
  del argv  # cli.run rejects positional arguments and reports a missing run directory (exit 2).
  return jobs.stop(_WORKDIR.value, dry_run=_DRY_RUN.value)


def run() -> None:
  """Console-script entry point (`rg-launch-stop`)."""
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, __doc__)


if __name__ == "__main__":
  run()
