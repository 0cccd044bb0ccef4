"""Every command line tool: `--help` lists its flags and exits 0; typical mistakes are one line, exit 2.

Each case runs in its own process. To keep the suite fast, one harness process per command imports
the command's module once (as a console script does) and forks a child per case that calls its
`run()`: the children share the import but have their own flags, output and exit code. One case
per family also runs the real `python -m` command.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from recurrentgemma_tpu import cli
from recurrentgemma_tpu import experiment as experiment_lib
from recurrentgemma_tpu import presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HARNESS = r"""
import importlib, json, os, runpy, sys, tempfile
module, cases = sys.argv[1], json.loads(sys.stdin.read())
main_only = module.endswith(".__main__")  # runs only as __main__: preload its package's imports
mod = importlib.import_module(module.rsplit(".", 1)[0] if main_only else module)
results = []
for argv in cases:
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        sys.argv = [module] + argv
        code = 0
        try:
            if main_only:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                mod.run()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback; traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        if "recurrentgemma_tpu.cli" in sys.modules:
            sys.modules["recurrentgemma_tpu.cli"].stop_native_filter()  # atexit does not run
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0); err.seek(0)
    results.append({"rc": os.waitstatus_to_exitcode(status), "out": out.read().decode(),
                    "err": err.read().decode()})
print(json.dumps(results))
"""


def _env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop(cli.RAW_LOGS_ENV, None)
  return env


def run_cases(module: str, cases: list[list[str]]) -> list[dict]:
  proc = subprocess.run([sys.executable, "-c", _HARNESS, module], input=json.dumps(cases),
                        capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_help(result: dict, flags: list[str]) -> None:
  assert result["rc"] == 0, result
  text = result["out"]
  for flag in flags:
    assert f"--{flag}" in text, (flag, text)
  assert "python -m " in text, text  # an example command
  assert "exit codes:" in text, text
  assert "DESIGN.md" not in text and "../shared" not in text, text
  # Only the command's own flags, not absl's or Orbax's.
  assert "--log_dir" not in text and "--experimental_orbax" not in text, text


def assert_one_line_error(result: dict, *needles: str) -> None:
  lines = [line for line in result["err"].splitlines() if line.strip()]
  assert result["rc"] == 2, result
  assert len(lines) == 1 and lines[0].startswith("error: "), result["err"]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


# (module, flags its help lists, [(mistake argv, words the error line must contain)]).
COMMANDS = [
    ("recurrentgemma_tpu.train", ["config", "workdir", "init_from", "accept_config_changes"], [
        (["--config=tiny", "--workdir=/tmp/x", "--config.train.stepz=5"],
         ["--config.train.stepz=5", 'Did you mean "steps"']),
        (["--config=configs/no_such.py", "--workdir=/tmp/x"], ["no such config file", "tiny"]),
        (["--config=tiny", "--workdir=/tmp/x", "--learning_rate=1"], ["learning_rate"]),
    ]),
    ("recurrentgemma_tpu.compile", ["config", "topology", "mesh", "search", "num_slices"], [
        (["--config=tiny", "--topology=v5e:3x3"], ["v5e:3x3"]),
        (["--config=tiny", "--topology=v9x:2x2"], ["v9x"]),
        (["--config=tiny", "--topology=v5e:2x2", "--mesh=1,2"], ["--mesh"]),
    ]),
    ("recurrentgemma_tpu.sample", ["workdir", "prompt", "temperature", "top_k"], [
        ([], ["--workdir is required"]),
        (["--workdir=/no/such/dir"], ["/no/such/dir"]),
        (["--workdir=/tmp", "--temperature=hot"], ["--temperature"]),
    ]),
    ("recurrentgemma_tpu.checkpoints.export_hf", ["workdir", "output", "step", "dtype"], [
        (["--output=/tmp/x"], ["--workdir is required"]),
        (["--workdir=/no/such/dir", "--output=/tmp/x"], ["/no/such/dir"]),
        (["--workdir=/tmp", "--output=/tmp/x", "--dtype=float16"], ["--dtype"]),
    ]),
    ("recurrentgemma_tpu.model.summary", ["config", "seq_len"], [
        ([], ["--config is required"]),
        (["--config=tiny", "--config.model.widht=3"], ['Did you mean "width"']),
        (["--config=tiny", "--config.model.width=-5"], ["width", "-5"]),
        (["--config=tests/data/config_without_get_config.py"], ["defines no get_config()"]),
        (["--config=tests/data/config_returning_none.py"], ["returned NoneType"]),
        (["--config=tests/data/config_returning_none.py", "--config.train.steps=3"],
         ["returned NoneType"]),
        (["--config=ladder:griffin,2b"], ["size='2b' must be one of", "'1b'"]),
        (["--config=configs/griffin_14b.py:x"], ["no such config file", "griffin_14b"]),
    ]),
    ("recurrentgemma_tpu.checkpoints.convert", ["input", "output", "preset"], [
        (["--output=/tmp/x"], ["--input is required"]),
        (["--input=/no/such/dir", "--output=/tmp/x"], ["/no/such/dir"]),
        (["--input=/tmp", "--output=/tmp/x", "--preset=rg_3b"], ["--preset"]),
    ]),
    ("recurrentgemma_tpu.data.prepare", ["config", "store", "runner", "num_workers", "show_rows"], [
        ([], ["--config is required"]),
        (["--config=tiny", "--num_workers=0"], ["--num_workers=0"]),
        (["--config=tiny", "--runner=DirectRuner"], ["--runner='DirectRuner'", "DataflowRunner"]),
        (["--config=tiny", "--projct=p"], ["--projct=p", "need --runner"]),
        (["--config=tiny", "--config.data.seqlen=3"], ["seqlen", "Did you mean"]),
    ]),
    ("launch.submit", ["config", "workdir", "target", "backend", "dry_run"], [
        (["--config=tiny"], ["--workdir is required"]),
        (["--config=tiny", "--workdir=/tmp/x", "--target=v9z-3"], ["v9z"]),
        (["--config=tiny", "--workdir=/tmp/x", "--backend=slurm"], ["--backend"]),
    ]),
    ("launch.sweep.__main__", ["sweep", "root", "parallel"], [
        (["explode", "--sweep=x", "--root=/tmp/x"], ["run|status"]),
        (["run", "--root=/tmp/x"], ["--sweep"]),
        (["run", "--sweep=configs/sweeps/no_such.py", "--root=/tmp/x"], ["no_such"]),
    ]),
] + [
    (f"launch.{name}", ["workdir", *extra], [
        ([], ["--workdir is required"]),
        (["--workdir=/no/such/run"], ["/no/such/run"]),
        (["--workdir=/tmp/x", "stray"], ["stray"]),
    ]) for name, extra in (("status", ["goodput"]), ("logs", ["follow", "lines"]),
                           ("stop", ["dry_run"]), ("gc", ["dry_run"]), ("profile", ["steps", "process"]))
]


@pytest.mark.parametrize("module,flags,mistakes", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_and_mistakes(module, flags, mistakes):
  results = run_cases(module, [["--help"]] + [argv for argv, _ in mistakes])
  assert_help(results[0], flags)
  for (argv, needles), result in zip(mistakes, results[1:]):
    assert_one_line_error(result, *needles)
    assert "Traceback" not in result["err"] and not result["out"].strip(), (argv, result)


def test_real_entry_points():
  """`python -m` (module docstring as __main__) and the console script print the same help."""
  env = _env()
  proc = subprocess.run([sys.executable, "-m", "recurrentgemma_tpu.train", "--help"],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert_help({"rc": proc.returncode, "out": proc.stdout}, ["config", "workdir"])
  proc = subprocess.run([sys.executable, "-m", "recurrentgemma_tpu.train", "--config=tiny",
                         "--workdir=/tmp/x", "--config.train.stepz=5"],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert_one_line_error({"rc": proc.returncode, "err": proc.stderr}, 'Did you mean "steps"')


def test_presets_resolve_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  tiny = os.path.join(ROOT, "configs", "tiny.py")
  ladder = os.path.join(ROOT, "configs", "ladder.py")
  for spec in ("tiny", "tiny.py", "configs/tiny.py", "configs:tiny", "recurrentgemma_tpu:tiny"):
    assert os.path.samefile(presets.resolve(spec), tiny), spec
  assert presets.resolve("ladder:griffin,1b") == ladder + ":griffin,1b"
  # Named points of the ladder and of RecurrentGemma have no file of their own.
  for spec in ("griffin_14b", "configs/griffin_14b.py", "griffin_14b.py"):
    assert presets.resolve(spec) == ladder + ":griffin,14b", spec
  assert presets.resolve("recurrentgemma_9b") == os.path.join(ROOT, "configs",
                                                              "recurrentgemma.py") + ":9b"
  # A file in the working directory wins over a preset of the same name; unknown names pass through.
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "tiny.py").write_text("")
  (tmp_path / "configs" / "hawk_1b.py").write_text("")
  assert presets.resolve("configs/tiny.py") == "configs/tiny.py"
  assert presets.resolve("configs/hawk_1b.py") == "configs/hawk_1b.py"
  assert presets.resolve("no_such_preset") == "no_such_preset"
  assert presets.resolve("griffin_2b") == "griffin_2b"
  names = presets.names()
  assert {"tiny", "ladder", "griffin_100m", "mqa_14b", "recurrentgemma_2b"} <= set(names)
  assert "base" not in names and "recipe" not in names


def test_config_files_that_are_not_configs_say_so():
  # A config loaded earlier in the process must not lend its get_config() to the next file.
  experiment_lib.load_config("tiny")
  for name, expected in (("config_without_get_config.py", "defines no get_config()"),
                         ("config_returning_none.py", "returned NoneType, not a ConfigDict")):
    with pytest.raises(ValueError, match=re.escape(expected)):
      experiment_lib.load_config(os.path.join(ROOT, "tests", "data", name))
  # get_config's own ValueError is its message, not ml_collections' traceback flattened.
  with pytest.raises(ValueError, match=r"size='2b' must be one of") as e:
    experiment_lib.load_config("ladder:griffin,2b")
  assert "Traceback" not in str(e.value)


def test_native_noise_filter_keeps_real_errors():
  noise = [
      "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
      "I0000 00:00:1796067150.714678   25277 cudart_stub.cc:31] Could not find cuda drivers on your "
      "machine, GPU will not be used.",
      "E0000 00:00:1796067163.677907   25277 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
      "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
      "E1130 20:00:32.263241    8117 slow_operation_alarm.cc:73] ",
      "*" * 32,
      "[Compiling module jit_train_step for CPU] Very slow compile? If you want to file a bug, run "
      "with envvar XLA_FLAGS=--xla_dump_to=/tmp/foo and attach the results.",
      "",
  ]
  real = ["E0000 00:00:1.0 1 pjrt_client.cc:1] RESOURCE_EXHAUSTED: out of memory", "",
          "Traceback (most recent call last):"]
  proc = subprocess.run([sys.executable, "-c", cli._FILTER_SCRIPT, *cli.NOISE_PATTERNS],
                        input="\n".join(noise + real) + "\n", capture_output=True, text=True)
  assert proc.stderr.splitlines() == real


def test_config_error_lines():
  error = AttributeError(KeyError("'stepz'\nDid you mean \"steps\" instead of \"stepz\"?"))
  line = cli.config_error(error, ["--config=configs/tiny.py", "--config.train.stepz=5"])
  assert line.startswith("--config.train.stepz=5: 'stepz' is not a field"), line
  assert 'Did you mean "steps"' in line and "\n" not in line


def test_start_up_block_and_workdir_state(tmp_path):
  block = cli.format_block("train", [("model", "griffin"), ("parameters", "1.78M")])
  assert block.splitlines() == ["train", "  model:      griffin", "  parameters: 1.78M"]
  assert cli.workdir_state(str(tmp_path), 600) == "fresh start"
  (tmp_path / "checkpoints" / "200").mkdir(parents=True)
  (tmp_path / "checkpoints" / "400").mkdir()
  assert cli.workdir_state(str(tmp_path), 600) == (
      "newest checkpoint step 400; checked against this config before resuming")
  assert "then only evaluates" in cli.workdir_state(str(tmp_path), 400)
  assert cli.model_family(("recurrent", "recurrent", "local_attention")) == "griffin"
  assert cli.model_family(("recurrent",)) == "hawk"
  assert cli.model_family(("global_attention",)) == "mqa"
  assert cli.human(1_780_000) == "1.78M" and cli.human(2.0e9) == "2B"


def test_docs_stand_alone():
  """README, docs/ and the commands' docstrings name no file outside the repository."""
  paths = [os.path.join(ROOT, "README.md")] + [
      os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")]
  for package in ("recurrentgemma_tpu", "launch"):
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
      paths += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]
  for path in paths:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    for outside in ("DESIGN.md", "../shared", "/work/shared"):
      assert outside not in text, (path, outside)
