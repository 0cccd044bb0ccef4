"""`python -m recurrentgemma_tpu.evaluate`, `config.eval` and the downstream results files.

The command-line and training-loop tests run lm-eval for real (slow tier); the config and results
checks are fast and need neither jax compiles nor lm-eval.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from recurrentgemma_tpu import experiment as experiment_lib
from recurrentgemma_tpu.checkpoints import manager as ckpt
from recurrentgemma_tpu.downstream import results as results_lib
from test_train_common import REPO, small_config, subprocess_env, train_command


# ------------------------------------------------------------------------------------ fast


@pytest.mark.parametrize("field, value, needle", [
    ("every", -1, "config.eval.every=-1 must be >= 0"),
    ("limit", -2, "config.eval.limit=-2 must be >= 0"),
    ("num_fewshot", -3, "config.eval.num_fewshot=-3"),
    ("batch_size", 0, "config.eval.batch_size=0 must be >= 1"),
    ("max_length", 1, "config.eval.max_length=1 must be >= 2"),
])
def test_config_eval_values_are_checked_by_name(field, value, needle):
  config = small_config(**{f"eval__{field}": value})
  with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    experiment_lib.build(config, num_devices=1)


def test_evaluating_during_training_needs_tasks_and_unknown_fields_are_named():
  with pytest.raises(ValueError, match="config.eval.every=5 needs config.eval.tasks"):
    experiment_lib.build(small_config(eval__every=5, eval__tasks=" , "), num_devices=1)
  config = small_config()
  config.eval.unlock()
  config.eval.evry = 3
  with pytest.raises(ValueError, match="did you mean config.eval.every"):
    experiment_lib.build(config, num_devices=1)
  exp = experiment_lib.build(small_config(eval__tasks="a, b,,c"), num_devices=1)
  assert exp.eval.task_names == ("a", "b", "c") and exp.eval.every == 0


def test_results_are_flattened_written_whole_and_read_back(tmp_path):
  lm_eval_results = {
      "rg_stdlib_next_line": {"alias": "x", "sample_len": 4, "acc,none": 0.5, "acc_stderr,none": "N/A",
                              "acc_norm,none": 0.25},
      "gsm8k": {"exact_match,strict-match": 0.125, "exact_match,flexible-extract": 0.25,
                "bad,none": float("nan")},
  }
  scores = results_lib.flatten(lm_eval_results)
  assert scores == {"rg_stdlib_next_line/acc": 0.5, "rg_stdlib_next_line/acc_norm": 0.25,
                    "gsm8k/exact_match_strict-match": 0.125,
                    "gsm8k/exact_match_flexible-extract": 0.25}
  results_lib.write(str(tmp_path), 20, scores, {"tasks": ["x"]}, tensorboard=False)
  results_lib.write(str(tmp_path), 100, {"a/b": 1.0}, {}, tensorboard=False)
  assert results_lib.read_scores(str(tmp_path)) == {20: scores, 100: {"a/b": 1.0}}
  assert not [f for f in os.listdir(tmp_path / "downstream") if f.endswith(".tmp")]
  assert results_lib.read_scores(str(tmp_path / "nothing")) == {}


# ------------------------------------------------------------------------------------ slow


def _workdir(path, steps=(5,)):
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  config = small_config()
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  if steps:
    cfg = model_lib.ModelConfig.from_config(config.model)
    params = flax.core.meta.unbox(model_lib.init_params(cfg, jax.random.key(1)))
    m = ckpt.CheckpointManager(os.path.join(path, "checkpoints"), ckpt.CheckpointOptions(1, 5, 0, False))
    for s in steps:
      m.save(s, params, {"step": np.int32(s)}, {})
    m.close()
  return str(path)


def _evaluate(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "recurrentgemma_tpu.evaluate", *args], cwd=REPO,
                        env=subprocess_env(1), capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc, *needles):
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  for needle in needles:
    assert needle in errors[0], errors[0]


@pytest.mark.slow
def test_bad_requests_are_one_line_and_exit_2(tmp_path):
  pytest.importorskip("lm_eval")
  empty = _workdir(tmp_path / "empty", steps=())
  _one_error_line(_evaluate(f"--workdir={empty}", "--tasks=rg_stdlib"), "has no checkpoint yet")
  _one_error_line(_evaluate(f"--workdir={tmp_path / 'missing'}"), "has no config.json")
  wd = _workdir(tmp_path / "wd", steps=(3, 5))
  _one_error_line(_evaluate(f"--workdir={wd}", "--step=4", "--tasks=rg_stdlib"),
                  "--step=4 has no checkpoint", "[3, 5]")
  _one_error_line(_evaluate(f"--workdir={wd}", "--tasks=rg_stdlib_next_lin,hellaswag_xyz"),
                  "unknown lm-eval task", "'rg_stdlib_next_lin' (did you mean 'rg_stdlib_next_line'?)",
                  "'hellaswag_xyz'")
  _one_error_line(_evaluate(f"--workdir={wd}", "--tasks=rg_stdlib", "--batch_size=0"),
                  "--batch_size=0 must be >= 1")


@pytest.mark.slow
def test_evaluate_writes_scores_json_and_tensorboard(tmp_path):
  pytest.importorskip("lm_eval")
  wd = _workdir(tmp_path / "wd", steps=(3, 5))
  proc = _evaluate(f"--workdir={wd}", "--step=3", "--tasks=rg_stdlib", "--limit=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads((tmp_path / "wd" / "downstream" / "step_3.json").read_text())
  scores = record["scores"]
  assert set(scores) >= {"rg_stdlib_next_line/acc", "rg_stdlib_complete/exact_match",
                         "rg_stdlib_ppl/bits_per_byte"}
  assert {k: v for k, v in record["n-samples"].items()} == {
      t: {"original": n, "effective": 3} for t, n in
      (("rg_stdlib_next_line", 200), ("rg_stdlib_complete", 100), ("rg_stdlib_ppl", 50))}
  # An untrained model: chance-level choices and a perplexity far above a trained model's.
  assert 0.0 <= scores["rg_stdlib_next_line/acc"] <= 1.0
  assert scores["rg_stdlib_ppl/bits_per_byte"] > 2.0
  for name, value in scores.items():
    assert f"{name:<48} {value:.6g}" in proc.stdout
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  events = tf.io.gfile.glob(str(tmp_path / "wd" / "tensorboard" / "downstream" / "events*"))
  tags = {(v.tag, e.step) for path in events for e in tf.compat.v1.train.summary_iterator(path)
          for v in e.summary.value}
  assert ("downstream/rg_stdlib_next_line/acc", 3) in tags


@pytest.mark.slow
def test_training_evaluates_downstream_every_n_steps(tmp_path):
  pytest.importorskip("lm_eval")
  wd = tmp_path / "run"
  cmd = train_command(str(wd), **{"train.steps": 4, "eval.every": 2, "eval.tasks": "rg_stdlib_next_line",
                                  "eval.limit": 4, "checkpoint.save_every": 4})
  proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(1), capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  scores = results_lib.read_scores(str(wd))
  assert sorted(scores) == [2, 4]
  assert all(set(s) == {"rg_stdlib_next_line/acc", "rg_stdlib_next_line/acc_norm"}
             for s in scores.values())
  # The step-4 scores are those of the saved step-4 parameters, evaluated again by the command.
  proc = _evaluate(f"--workdir={wd}", "--step=4", "--tasks=rg_stdlib_next_line", "--limit=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert results_lib.read_scores(str(wd))[4] == scores[4]


_SWEEP = """
import ml_collections
from launch.sweep.axes import sweep

def get_sweep(arg=""):
  s = ml_collections.ConfigDict()
  s.name = "t"
  s.base = "configs/tiny.py"
  s.overrides = {"model": {"num_layers": 3, "vocab_size": 1024}, "train": {"eval_every": 0}}
  s.choices = {"size": {"s": {"model": {"width": 64, "num_heads": 1}}}}
  s.axes = sweep("size", ["s"])
  s.tokens = {"rule": "config"}
  s.budgets = ()
  s.schedule = {"decay_with_steps": True, "warmup_fraction": 0.1}
  s.lr = {"rule": "config"}
  s.metric = "eval/loss"
  s.retries = 1
  return s
"""


def test_sweep_rows_carry_the_newest_downstream_scores(tmp_path, monkeypatch):
  from launch.sweep import definition, report  # pylint: disable=g-import-not-at-top
  from launch.sweep import state as state_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(REPO)  # the sweep's base is a repo-relative config path
  (tmp_path / "s.py").write_text(_SWEEP)
  trial, = definition.expand(definition.load_sweep(str(tmp_path / "s.py")))
  root = str(tmp_path / "root")
  row = report.row(root, trial, retries=1, version="x")
  assert row["downstream"] == {} and row["downstream_step"] is None
  workdir = state_lib.trial_dir(root, trial.id)
  results_lib.write(workdir, 10, {"rg_stdlib_next_line/acc": 0.25}, {}, tensorboard=False)
  results_lib.write(workdir, 30, {"rg_stdlib_next_line/acc": 0.5}, {}, tensorboard=False)
  row = report.row(root, trial, retries=1, version="x")
  assert row["downstream"] == {"rg_stdlib_next_line/acc": 0.5} and row["downstream_step"] == 30
  assert set(report.COLUMNS) >= set(row)


@pytest.mark.slow
def test_sweep_collect_evaluates_finished_trials_once(tmp_path, monkeypatch):
  pytest.importorskip("lm_eval")
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from launch.sweep import definition, report  # pylint: disable=g-import-not-at-top
  from launch.sweep import state as state_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("PYTHONPATH", subprocess_env(1)["PYTHONPATH"])
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  (tmp_path / "s.py").write_text(_SWEEP)
  sweep = definition.load_sweep(str(tmp_path / "s.py"))
  trial, = definition.expand(sweep)
  root = str(tmp_path / "root")
  workdir = state_lib.trial_dir(root, trial.id)
  config = experiment_lib.load_config(trial.spec, trial.overrides)
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  cfg = model_lib.ModelConfig.from_config(config.model)
  params = flax.core.meta.unbox(model_lib.init_params(cfg, jax.random.key(0)))
  m = ckpt.CheckpointManager(os.path.join(workdir, "checkpoints"), ckpt.CheckpointOptions(1, 1, 0, False))
  m.save(trial.info["steps"], params, {"step": np.int32(0)}, {})
  m.close()
  # Not finished yet: nothing is evaluated.
  report.collect(root, sweep, [trial], downstream_tasks="rg_stdlib_next_line", downstream_limit=2)
  assert results_lib.read_scores(workdir) == {}
  n = state_lib.claim(root, trial.id)
  state_lib.record_attempt(root, trial.id, n, "done")
  report.collect(root, sweep, [trial], downstream_tasks="rg_stdlib_next_line", downstream_limit=2)
  row, = report.read_results(root)
  assert row["downstream_step"] == trial.info["steps"]
  assert set(row["downstream"]) == {"rg_stdlib_next_line/acc", "rg_stdlib_next_line/acc_norm"}
  written = os.path.getmtime(results_lib.path_for(workdir, trial.info["steps"]))
  report.collect(root, sweep, [trial], downstream_tasks="rg_stdlib_next_line", downstream_limit=2)
  assert os.path.getmtime(results_lib.path_for(workdir, trial.info["steps"])) == written  # once
