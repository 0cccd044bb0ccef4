"""What every command-line tool shares: help, one-line user errors, a quiet start-up, the start-up block.

Each entry point (`python -m recurrentgemma_tpu.train`, `.compile`, `.sample`, `.model.summary`,
`.checkpoints.convert`, `.data.prepare`, `launch.*`) hands its `main` to `run`:

* `--help` (also `-h`, `--helpshort`, `--helpfull`) prints the module's docstring (description and
  example), the command's own flags and the exit codes, then exits 0. absl prints `__main__`'s
  docstring, which for a console script (`rg-train`) is pip's generated wrapper, hence only `USAGE:`;
  here the text comes from the module that defines the command.
* A user error (unknown or malformed flag, misspelled `--config.GROUP.KEY`, bad value, missing path)
  is one line on stderr, `error: ... (hint)`, and exit 2 before anything is compiled. Tracebacks only
  for internal errors, or for every error with `--verbosity=1`.
* Third-party start-up noise is dropped: INFO records of libraries (jax backend probing, Orbax, seqio,
  TFDS) and a short list of known native-code lines (TensorFlow's CUDA probing on a machine without a
  GPU, `E0000 ... failed call to cuInit`, libtpu's metadata guesses on a non-TPU host). Warnings and
  errors of every library still appear. `--verbosity=1` keeps everything; RECURRENTGEMMA_TPU_RAW_LOGS=1
  only leaves stderr unfiltered.
* `--config=NAME[:ARG]` also names a preset of the installed `configs` package (`--config=tiny`,
  `--config=ladder:griffin,1b`, `--config=griffin_1b`), and `--config=configs/NAME.py` works from any
  directory (`recurrentgemma_tpu/presets.py` resolves the names).

This module imports nothing heavy (no jax, no TensorFlow): help and flag errors are instant.
"""

from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys
import traceback
from typing import Any, Callable, Iterable, NoReturn, Sequence

from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import presets

EXIT_CODES_HELP = "exit codes: 0 success, 1 internal error (traceback printed), 2 user error (one line)."
TRAIN_EXIT_CODES_HELP = (
    "exit codes: 0 done (also: already complete), 1 internal error (traceback printed), 2 user error\n"
    "(one line, nothing compiled), 3 NaN/Inf stop, 42 preempted or stopped (re-run to resume).")
HELP_FLAGS = ("--help", "-h", "--helpshort", "-?", "--helpfull")
RAW_LOGS_ENV = "RECURRENTGEMMA_TPU_RAW_LOGS"
# Top-level packages of this project: their INFO log records are kept, other libraries' dropped.
PACKAGES = ("recurrentgemma_tpu", "sharding", "pallas_kernels", "launch", "configs", "benchmarks")

# Native (C++) log lines known to be harmless start-up chatter. Matched per line on stderr.
NOISE_PATTERNS = (
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"WARNING: Logging before InitGoogle\(\) is written to STDERR",
    r"^[IW]\d{4} .*cudart_stub\.cc",  # "Could not find cuda drivers on your machine"
    r"^E\d{4} .*cuda_platform\.cc:\d+\] failed call to cuInit",  # no GPU driver: TF probing
    r"^E\d{4} .*Unable to register cu(DNN|FFT|BLAS) factory",
    r"^W\d{4} .*computation_placer\.cc:\d+\] computation placer already registered",
    r"^[IW]\d{4} .*cpu_feature_guard\.cc",  # "This TensorFlow binary is optimized to use ..."
    r"could not determine TPU (accelerator type|worker hostnames)",  # libtpu on a non-TPU host
    r"^E\d{4} .*common_lib\.cc:\d+\] INVALID_ARGUMENT: Error: unexpected worker hostname",
    r"^=== Source Location Trace: === *$",
    r"^learning/45eac/tfrc/runtime/libtpu_init_utils\.cc:\d+ *$",
    # XLA's "Very slow compile?" alarm (an E line framed by asterisks) on a busy CPU; the trainer
    # reports the first step's time itself.
    r"^E\d{4} .*slow_operation_alarm\.cc",
    r"^\*{20,}\s*$",
    r"Very slow compile\? If you want to file a bug",
    # ml_collections' warning for a get_config() that returned None: the error line says it.
    r"^WARNING: Logging before flag parsing goes to stderr\.$",
    r"config_flags\.py:\d+\] .*get_config\(\) returned None",
)


# ------------------------------------------------------------------------------------ presets


def rewrite_config_args(argv: Sequence[str], names: Iterable[str] = ("config",)) -> list[str]:
  """argv with each `--NAME=SPEC` (NAME a config-file flag) resolved by `presets.resolve`."""
  out = list(argv)
  for name in names:
    for i, a in enumerate(out):
      if a.startswith(f"--{name}="):
        out[i] = f"--{name}=" + presets.resolve(a.split("=", 1)[1])
      elif a == f"--{name}" and i + 1 < len(out):
        out[i + 1] = presets.resolve(out[i + 1])
  return out


# ------------------------------------------------------------------------------------ quiet start-up


def verbosity(argv: Sequence[str]) -> int:
  """The --verbosity (-v) value in argv, without parsing flags (0 if absent or malformed)."""
  for i, a in enumerate(argv):
    m = re.fullmatch(r"--?(?:verbosity|v)(?:=(-?\d+))?", a)
    if m:
      value = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else "0")
      try:
        return int(value)
      except ValueError:
        return 0
  return 0


def quiet_environment() -> None:
  """Environment defaults that silence library start-up chatter; call before jax/TF start."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's own INFO and WARNING lines
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


_FILTER_SCRIPT = r"""
import re, sys
noise = re.compile("|".join(sys.argv[1:]))
out = open(2, "wb", buffering=0, closefd=False)
dropped = False
for line in sys.stdin.buffer:
    text = line.decode("utf-8", "replace")
    # A blank line right after a dropped one belongs to the same noise block.
    dropped = bool(noise.search(text)) or (dropped and not text.strip())
    if not dropped:
        out.write(line)
"""
_filter: subprocess.Popen | None = None
_restore: list[Callable[[], None]] = []


def filter_native_stderr(patterns: Sequence[str] = NOISE_PATTERNS) -> None:
  """Drops the known noise lines that native code writes to file descriptor 2.

  C++ libraries (TensorFlow, XLA, libtpu) write past Python's logging, so stderr is piped through a
  small child process that forwards every other line. The child outlives a crash of this process, so
  a fatal native error still reaches the terminal or log file in full. It runs in its own session:
  a signal to this process's group (a launcher's or scheduler's SIGTERM, Ctrl-C's SIGINT) must not
  kill it first, or this process's next write to stderr fails and it dies before it can save.
  """
  global _filter
  if _filter is not None or os.environ.get(RAW_LOGS_ENV) == "1":
    return
  try:
    read_fd, write_fd = os.pipe()
    _filter = subprocess.Popen([sys.executable, "-c", _FILTER_SCRIPT, *patterns], stdin=read_fd,
                               close_fds=True, start_new_session=True)
  except OSError:
    return  # no filter is better than no command
  os.close(read_fd)
  sys.stderr.flush()
  saved = os.dup(2)
  os.dup2(write_fd, 2)
  os.close(write_fd)

  def restore() -> None:  # lets the child drain before the shell prompt comes back
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(saved, 2)
    try:
      _filter.wait(timeout=5)
    except subprocess.TimeoutExpired:
      pass  # a subprocess still holds the pipe; the child keeps forwarding until it closes

  _restore.append(restore)
  atexit.register(stop_native_filter)


def stop_native_filter() -> None:
  """Puts the real stderr back and lets the filter drain (at exit; also before `os._exit`)."""
  while _restore:
    _restore.pop()()


def _own_file(path: str, roots: tuple[str, ...]) -> bool:
  return path.startswith(roots)


def quiet_python_logging(keep_all: bool = False) -> None:
  """Keeps this project's INFO records and every library's WARNING+; a short line prefix."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top

  base = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  roots = tuple(os.path.join(base, p) + os.sep for p in PACKAGES)

  class ProjectInfoOnly(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
      return keep_all or record.levelno >= std_logging.WARNING or _own_file(record.pathname, roots)

  class ShortFormatter(std_logging.Formatter):
    """`HH:MM:SS message` (warnings and errors name their level); absl's prefix is ~55 chars."""

    def format(self, record: std_logging.LogRecord) -> str:
      level = "" if record.levelno < std_logging.WARNING else f"{record.levelname}: "
      text = f"{self.formatTime(record, '%H:%M:%S')} {level}{record.getMessage()}"
      if record.exc_info:
        text += "\n" + self.formatException(record.exc_info)
      return text

  handler = logging.get_absl_handler()
  handler.addFilter(ProjectInfoOnly())
  if not keep_all:
    handler.python_handler.setFormatter(ShortFormatter())


# ------------------------------------------------------------------------------------ help and errors


def fail(message: str, hint: str = "", code: int = exit_codes.USER_ERROR,
         label: str = "error") -> NoReturn:
  """Prints `LABEL: MESSAGE (HINT)` as one line on stderr and exits with `code`."""
  text = " ".join(str(message).split())
  if hint:
    text += f" ({hint})"
  sys.stdout.flush()
  print(f"{label}: {text}", file=sys.stderr, flush=True)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.flush()
  sys.exit(code)


def one_line(error: BaseException) -> str:
  """An exception's message on one line (KeyError's repr quotes removed)."""
  while len(error.args) == 1 and isinstance(error.args[0], BaseException):
    error = error.args[0]  # ml_collections raises AttributeError(KeyError(message))
  text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
  return " ".join(text.split())


def help_text(doc: str, full: bool = False, codes: str = EXIT_CODES_HELP) -> str:
  """The module docstring, then the command's own flags (every flag with `full`), then exit codes."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if full:
    flag_text = f.get_help()
  else:
    base = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # The command's own flags: modules of this project (by name, or by path under `python -m`),
    # not those of absl, Orbax or other libraries.
    modules = [m for m in f.flags_by_module_dict()
               if m.split(".")[0] in PACKAGES or m == "__main__"
               or (m.endswith(".py") and os.path.abspath(m).startswith(base + os.sep))]
    # module_help starts with the defining file's path: a header that means nothing to a user.
    flag_text = "\n".join(f.module_help(m).lstrip("\n").split("\n", 1)[-1] for m in modules)
    flag_text += ("\n\n  --verbosity: 1 shows library logs and every traceback (default: 0)."
                  "\n  --helpfull: every flag, absl's logging flags included.")
  return f"{doc.strip()}\n\nflags:\n{flag_text}\n\n{codes}\n"


def parse_flags(argv: Sequence[str], doc: str, config_flags_names: Iterable[str] = ("config",),
                split: Callable[[list[str]], list[str]] | None = None,
                codes: str = EXIT_CODES_HELP) -> list[str]:
  """absl flag parsing where --help exits 0 with `help_text` and a bad flag is one line, exit 2."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  argv = rewrite_config_args(argv, config_flags_names)
  for a in argv[1:]:
    if a == "--":
      break
    if a in HELP_FLAGS:
      try:
        sys.stdout.write(help_text(doc, full=a == "--helpfull", codes=codes))
        sys.stdout.flush()
      except BrokenPipeError:  # `rg-train --help | head`
        pass
      sys.exit(exit_codes.OK)
  try:
    return flags.FLAGS(split(list(argv)) if split else list(argv))
  except flags.Error as e:
    message = one_line(e)
    required = re.search(r"Flag --(\w+) must have a value other than None", message)
    if "Error whilst parsing config file" in message:
      fail(config_error(e, argv))  # get_config raised: its own message, not ml_collections' traceback
    if required:
      given = [a.partition("=")[2] for a in argv if a.startswith(f"--{required.group(1)}=")]
      problem = presets.problem(given[-1]) if given else None
      if problem:  # a config file whose get_config() returned None
        fail(problem)
      message = f"--{required.group(1)} is required"
    elif "config" in message and "Did you mean" not in message:
      message += "; config fields are set with --config.GROUP.KEY=VALUE"
    fail(message, "see --help")
  except Exception as e:  # pylint: disable=broad-except
    # A config file runs (and its overrides apply) while the flags are parsed: errors surface here.
    if verbosity(argv) >= 1:
      traceback.print_exc()
    fail(config_error(e, argv))


def config_error(error: BaseException, argv: Sequence[str], name: str = "config") -> str:
  """One line for a config file that failed to load or an override that does not apply."""
  spec = ([a.partition("=")[2] for a in argv if a.startswith(f"--{name}=")] or ["?"])[-1]
  chain = [error]
  while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  cause = next((c for c in chain if "Did you mean" in one_line(c)), chain[-1])
  message = one_line(cause)
  problem = None if "Did you mean" in message else presets.problem(spec)
  if problem:  # no get_config(), or it returned None: ml_collections' message names neither
    return f"--{name}={spec}: {problem}"
  if "Did you mean" in message or (isinstance(cause, (KeyError, AttributeError))
                                   and os.path.exists(spec.partition(":")[0])):
    # A misspelled `--config.GROUP.KEY`: ml_collections says `'stepz'\nDid you mean "steps"...`.
    bad = message.split()[0].strip("'\"") if message else "?"
    override = next((a for a in argv if a.startswith(f"--{name}.") and bad in a), f"--{name}.*")
    rest = " ".join(message.split()[1:])
    return (f"{override}: {bad!r} is not a field of the config. {rest} (every field is declared "
            "and documented in configs/base.py)").replace(". (", " (").replace(".  ", ". ")
  if not os.path.exists(spec.partition(":")[0]):
    return (f"--{name}={spec}: no such config file or preset (give a path, or a preset: "
            f"{', '.join(presets.names())})")
  if isinstance(cause, ValueError):  # get_config(ARG) refused its argument, naming what is valid
    return f"--{name}={spec}: {message}"
  return (f"--{name}={spec} could not be loaded: {type(cause).__name__}: {message} (the file must "
          "define get_config() returning a ConfigDict)")


def load_config_flag(holder: Any, name: str = "config") -> Any:
  """The value of a `config_flags.DEFINE_config_file` flag; load and override errors: UserError.

  The flag may read its file and apply `--config.K=V` overrides only when first read; a misspelled
  override then surfaces as a bare `KeyError('stepz\\nDid you mean...')`, reported here on one line.
  """
  try:
    config = holder.value
    config.keys()  # a file that failed to load yields a placeholder that raises on first use
    return config
  except Exception as e:  # pylint: disable=broad-except
    raise exit_codes.UserError(config_error(e, sys.argv, name)) from e


def run(main: Callable[[list[str]], int | None], doc: str | None, *,
        user_errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError,
                                                        NotADirectoryError),
        config_flags_names: Iterable[str] = ("config",),
        split: Callable[[list[str]], list[str]] | None = None,
        codes: str = EXIT_CODES_HELP, positional: bool = False) -> None:
  """Runs `main(argv) -> exit code` as a command: quiet start-up, help, flag and user errors.

  Whatever ends `main` ends the process with one line naming it and the exit code of
  `exit_codes.for_exception` (`error:` 2, `stopped (non-finite):` 3, `preempted:` 42,
  `internal error:` 1 after its traceback).

  Args:
    main: absl-style main; its return value (None = 0) is the exit code.
    doc: the command module's docstring (description, example).
    user_errors: exceptions reported as one line with exit 2 (exit_codes.UserError and
      app.UsageError always are); anything else takes its code from `exit_codes.for_exception`.
    config_flags_names: config-file flags whose presets are resolved (see `presets.resolve`).
    split: optional argv preprocessing before absl parses it (e.g. to peel off overrides).
    codes: the exit codes line of --help.
    positional: `main` takes positional arguments (else any is an error).
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  verbose = verbosity(sys.argv) >= 1
  if not verbose:
    quiet_environment()
    if not any(a in HELP_FLAGS for a in sys.argv[1:]):
      filter_native_stderr()
  errors = (exit_codes.UserError, app.UsageError) + tuple(user_errors)

  def wrapped(argv: list[str]) -> None:
    quiet_python_logging(keep_all=verbose)
    if len(argv) > 1 and not positional:
      fail(f"unexpected arguments {argv[1:]}", "flags look like --name=value; see --help")
    try:
      code = main(argv)
    except errors as e:
      if verbose:
        traceback.print_exc()
      explicit = isinstance(e, (exit_codes.UserError, app.UsageError))
      fail(one_line(e) or type(e).__name__,
           "" if verbose or explicit else "--verbosity=1 shows the traceback")
    except SystemExit:
      raise
    except BaseException as e:  # pylint: disable=broad-except
      code = exit_codes.for_exception(e)
      if verbose or exit_codes.wants_traceback(e):
        traceback.print_exc()
      # One line that names what happened; the launcher and the user read this.
      fail(one_line(e) or type(e).__name__, code=code, label=_LABELS[code])
    sys.exit(code or 0)

  app.run(wrapped,
          flags_parser=lambda argv: parse_flags(argv, doc or "", config_flags_names, split, codes))


_LABELS = {exit_codes.USER_ERROR: "error", exit_codes.NON_FINITE: "stopped (non-finite)",
           exit_codes.PREEMPTED: "preempted", exit_codes.INTERNAL: "internal error"}


# ------------------------------------------------------------------------------------ progress


def duration(seconds: float) -> str:
  """`1h02m`, `3m05s` or `12.3s`."""
  if seconds < 60:
    return f"{seconds:.1f}s"
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class phase:  # pylint: disable=invalid-name
  """`with phase("compiling", log):` logs the start, `still compiling (1m30s)` every `every` seconds
  while it runs (a long blocking call otherwise looks hung), and `compiling: 4m03s` at the end."""

  def __init__(self, label: str, log: Callable[[str], None] = print, every: float = 30.0):
    self.label, self.log, self.every = label, log, every
    self.seconds = 0.0

  def __enter__(self) -> "phase":
    import threading  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top
    self._time = time.monotonic
    self._start = time.monotonic()
    self._done = threading.Event()
    self.log(f"{self.label} ...")

    def tick() -> None:
      while not self._done.wait(self.every):
        self.log(f"  still {self.label} ({duration(self._time() - self._start)})")

    self._thread = threading.Thread(target=tick, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc: Any) -> None:
    self._done.set()
    self.seconds = self._time() - self._start
    if exc[0] is None:
      self.log(f"{self.label}: done in {duration(self.seconds)}")


# ------------------------------------------------------------------------------------ start-up block


def format_block(title: str, rows: Sequence[tuple[str, str]]) -> str:
  """A titled, aligned `key: value` block (the start-up summary of long commands)."""
  width = max((len(k) for k, _ in rows), default=0)
  lines = [f"{title}"] + [f"  {k + ':':<{width + 1}} {v}" for k, v in rows]
  return "\n".join(lines)


def model_family(block_types: Sequence[str]) -> str:
  """griffin (recurrent + local attention), hawk (recurrent only) or mqa (attention only)."""
  kinds = set(block_types)
  recurrent = any("recurrent" in t for t in kinds)
  attention = any("attention" in t for t in kinds)
  return "griffin" if recurrent and attention else "hawk" if recurrent else "mqa"


def human(n: float) -> str:
  """12.3M, 1.23B, 456K."""
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3g}{unit}"
  return f"{n:.3g}"


def experiment_rows(exp: Any, *, config_spec: str = "") -> list[tuple[str, str]]:
  """What runs: model family and size, parameters, tokens per step, steps, FLOPs."""
  from recurrentgemma_tpu.checkpoints import hf_mapping  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu.model import flops  # pylint: disable=g-import-not-at-top
  m = exp.model
  total, non_embedding = flops.param_counts(m)
  per_token = flops.training_flops_per_token(m, exp.data.seq_len)
  rows = []
  if config_spec:
    rows.append(("config", config_spec))
  rows += [
      ("model", f"{model_family(m.block_types)}: {m.num_layers} blocks x width {m.width}, "
                f"vocab {m.vocab_size}"),
      ("parameters", f"{human(total)} ({human(non_embedding)} non-embedding)"),
      ("tokens", f"{exp.data.global_batch_size} x {exp.data.seq_len} = {exp.tokens_per_step:,} per "
                 f"step x {exp.train.steps:,} steps = {human(exp.total_tokens)}"),
      ("compute", f"{human(per_token * exp.total_tokens)} model FLOPs "
                  f"({human(per_token)} per token)"),
      ("hf export", hf_mapping.expressibility(m).short()),
      ("schedule", f"learning rate {exp.optimizer.learning_rate:.3g}, warm-up "
                   f"{exp.optimizer.warmup_steps:,} steps, cosine to x{exp.optimizer.final_lr_ratio:g} "
                   f"at step {exp.optimizer.decay_steps:,}"),
  ]
  return rows


def device_rows(exp: Any) -> list[tuple[str, str]]:
  """Where it runs: devices, mesh, processes (call after distributed initialisation)."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  mesh = " ".join(f"{k}={v}" for k, v in exp.mesh_shape.items() if v != 1) or "1 device"
  return [("devices", f"{jax.device_count()} x {device.device_kind} ({device.platform}), "
                      f"{jax.process_count()} process(es)"),
          ("mesh", f"{mesh} (strategy {exp.mesh.strategy})")]


def workdir_state(workdir: str, steps: int, init_from: str = "") -> str:
  """`fresh start` or the newest checkpoint step, from the checkpoint directory's listing.

  Only what the listing shows: whether that step is resumed (its config compared, its arrays
  read and verified) is decided later, so this never says "resuming" before a refusal.
  """
  from recurrentgemma_tpu import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  directory = workdir_lib.join(workdir, workdir_lib.CHECKPOINT_DIR)
  found = [int(d) for d in workdir_lib.listdir(directory) if d.isdigit()]
  if not found:
    return "fresh start" + (f" from the parameters of {init_from}" if init_from else "")
  latest = max(found)
  if latest >= steps:
    return f"newest checkpoint step {latest} of {steps}; checked before use, then only evaluates"
  return f"newest checkpoint step {latest}; checked against this config before resuming"
