"""Code shipping: a wheel of this project, built here and put next to the run.

Every pod host installs `<workdir>/launch/code/recurrentgemma_tpu-*.whl[tpu]` in its startup script
and runs `python -m recurrentgemma_tpu.train` from it. A wheel rather than a container image: the
TPU VM runtime images already have python and pip, nothing needs a registry or docker on the laptop,
and the wheel pins exactly the code that was submitted (a re-submit ships the current code again).
GKE pods install the same wheel on top of `--image`.
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile

from launch import gcloud
from launch import state as state_lib
from recurrentgemma_tpu import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_dir(workdir: str) -> str:
  return state_lib.path(workdir, "code")


def wheel_name() -> str:
  return "recurrentgemma_tpu-0.1.0-py3-none-any.whl"


def wheel_url(workdir: str) -> str:
  return workdir_lib.join(code_dir(workdir), wheel_name())


def build_argv(out_dir: str) -> list[str]:
  return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
          "-w", out_dir, REPO]


def ship(runner: gcloud.Runner, workdir: str) -> str:
  """Builds the wheel and copies it to the workdir; returns its URL there."""
  dest = wheel_url(workdir)
  if runner.dry_run:
    runner.run(build_argv("/tmp/rg-wheel"))
    runner.log(f"# copy /tmp/rg-wheel/{wheel_name()} -> {dest}")
    return dest
  with tempfile.TemporaryDirectory() as tmp:
    runner.run(build_argv(tmp))
    wheels = glob.glob(os.path.join(tmp, "recurrentgemma_tpu-*.whl"))
    if len(wheels) != 1:
      raise gcloud.CommandError(f"expected one wheel in {tmp}, found {wheels}")
    workdir_lib.copy(wheels[0], dest)
  return dest
