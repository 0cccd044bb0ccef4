"""Profile a running job on demand: N steps captured with the JAX profiler, without restarting.

  python -m launch.profile --workdir=DIR_OR_GS_URL --steps=N [--process=i|all]

Writes <workdir>/profile/request.json; the trainer's processes pick it up at their next step
boundaries, capture N steps into <workdir>/profile/<id>/ (open it with xprof: the `profile`
extra) and store a digest beside it: the share of step time in matmuls, the RG-LRU scan,
collectives, other device ops, data wait and idle, and the measured step time against the
planner's prediction. This command waits for the captures and prints the digests.
"""

from absl import flags

from launch import jobs

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of a running job (local path or gs://).")
_STEPS = flags.DEFINE_integer("steps", 5, "Training steps to capture.")
_PROCESS = flags.DEFINE_string("process", "0", "The process to capture (an index) or all.")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> int:
  del argv  # cli.run rejects positional arguments and reports a missing run directory (exit 2).
  return jobs.profile(_WORKDIR.value, _STEPS.value, _PROCESS.value)


def run() -> None:
  """Console-script entry point (`rg-launch-profile`)."""
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, __doc__, codes=(
      "exit codes: 0 every capture digested, 1 the job stopped first or a capture failed (one line\n"
      "says which), 2 user error (one line: bad flag, a workdir that is not running)."))


if __name__ == "__main__":
  run()
