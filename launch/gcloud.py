"""The one place that runs gcloud, kubectl (and the wheel build): argv lists, never shell strings.

With dry_run=True nothing runs; every argv is printed, shell-quoted, one per line.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Result:
  returncode: int
  stdout: str
  stderr: str


class CommandError(RuntimeError):
  """A command the launcher needed failed."""


class Runner:
  """Runs argv lists (or prints them in a dry run)."""

  def __init__(self, dry_run: bool = False, log: Callable[[str], None] = print,
               timeout_s: float = 600):
    self.dry_run = dry_run
    self.log = log
    self.timeout_s = timeout_s

  def run(self, argv: list[str], *, check: bool = True, input_text: str | None = None) -> Result:
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
      raise TypeError(f"argv must be a list of strings, got {argv!r}")
    if self.dry_run:
      self.log(shlex.join(argv))
      return Result(0, "", "")
    try:
      proc = subprocess.run(argv, capture_output=True, text=True, input=input_text,
                            timeout=self.timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
      raise CommandError(f"timed out after {self.timeout_s}s: {shlex.join(argv)}") from e
    except FileNotFoundError as e:
      raise CommandError(f"{argv[0]} is not installed (needed for: {shlex.join(argv)})") from e
    if check and proc.returncode != 0:
      raise CommandError(f"exit {proc.returncode}: {shlex.join(argv)}\n{proc.stderr.strip()[-2000:]}")
    return Result(proc.returncode, proc.stdout, proc.stderr)
