"""Cost before submit (launch/cost.py) and a submit that talks (plan summary, progress lines)."""

import json
import os
import re
import subprocess
import sys

import pytest

from launch import cost
from launch import jobs
from launch import preflight
from launch import progress
from launch import spec as spec_lib
from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import heartbeat
from sharding import planner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "configs", "prices", "example.yaml")


def _table(tmp_path, prices, name="prices.yaml", **fields):
  import yaml
  data = {"currency": "EUR", "date": "2026-11-30", "source": "a test", "prices": prices, **fields}
  path = tmp_path / name
  path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
  return str(path)


def _spec(tmp_path, **kw):
  base = dict(config="configs/tiny.py", overrides=("train.steps=123457", "data.global_batch_size=64", "data.eval_batch_size=64"),
              workdir=str(tmp_path / "run"), backend="tpu_vm",
              target=spec_lib.parse_target("v5p-32"), num_slices=2, capacity="spot",
              zone="us-east5-a", project="p", allow_local_workdir=True)
  base.update(kw)
  return spec_lib.JobSpec(**base)


def _rows(text: str) -> dict[str, str]:
  """The `# plan` block's `key: value` rows."""
  block = text.split("# plan\n", 1)[1].split("\n#", 1)[0]
  return dict(re.match(r"([a-z -]+):\s+(.*)", l).groups() for l in block.splitlines())


def _number(text: str) -> float:
  return float(re.match(r"([\d,]+\.?\d*(e[-+]\d+)?)", text).group(1).replace(",", ""))


# ------------------------------------------------------------------------------------ price table


def test_the_example_table_names_its_date_and_source_and_says_it_is_illustrative():
  table = cost.load(EXAMPLE)
  assert table.date and table.source and table.currency
  text = open(EXAMPLE).read().lower()
  assert "illustrative" in text
  assert table.price("v5p", "on-demand") > table.price("v5p", "spot") > 0


@pytest.mark.parametrize("prices, fields, match", [
    ({"v5p": {"spot": 0}}, {}, r"prices.v5p.spot=0 must be a positive number"),
    ({"v5p": {"spot": "cheap"}}, {}, r"prices.v5p.spot='cheap' must be a positive number"),
    ({"v9": {"spot": 1.0}}, {}, r"prices.v9 is not a chip generation \(known: v4, v5e, v5p, v6e\)"),
    ({"v5p": {"preemptible": 1.0}}, {}, r"prices.v5p.preemptible is not a capacity kind"),
    ({"v5p": {"spot": 1.0}}, {"source": ""}, r"source is empty"),
    ({"v5p": {"spot": 1.0}}, {"currencyy": "USD"}, r"unknown field\(s\) currencyy"),
])
def test_a_bad_table_is_refused_by_field(tmp_path, prices, fields, match):
  with pytest.raises(ValueError, match=match):
    cost.load(_table(tmp_path, prices, **fields))


def test_json_tables_and_unreadable_files(tmp_path):
  assert cost.load(_table(tmp_path, {"v6e": {"reserved": 1.5}}, "p.json")).price("v6e", "reserved") == 1.5
  with pytest.raises(ValueError, match="cannot read the price table"):
    cost.load(str(tmp_path / "missing.yaml"))


def test_a_missing_price_names_the_chip_capacity_and_what_the_table_has(tmp_path):
  table = cost.load(_table(tmp_path, {"v5p": {"on-demand": 4.0}}))
  with pytest.raises(ValueError, match=r"no price for v5p spot \(it has: v5p on-demand\)"):
    table.price("v5p", "spot")


# ------------------------------------------------------------------------------------ dry run


def _seed_fit_cache(tmp_path, monkeypatch, spec, step_s):
  """The fit check's cached verdict for this job, as the compile CLI would leave it."""
  monkeypatch.setenv("RG_LAUNCH_CACHE", str(tmp_path / "cache"))
  fp = preflight.fingerprint(spec)
  os.makedirs(preflight.cache_dir(), exist_ok=True)
  key = preflight.fit_cache_key(fp, spec.target, spec.num_slices)
  with open(os.path.join(preflight.cache_dir(), f"{key}.json"), "w") as f:
    json.dump({"fits": True, "report": "FITS: yes", "step_s": step_s}, f)


def test_dry_run_figures_are_chips_times_predicted_step_times_steps_times_price(tmp_path,
                                                                              monkeypatch):
  spec = _spec(tmp_path)
  # A step time as the planner's model makes it: max(compute, HBM) + ICI + DCN.
  step = planner.StepTime(compute_s=0.81, memory_s=1.13, ici_s=0.27, dcn_s=0.04,
                          collective_bytes=0.0, exact=True)
  _seed_fit_cache(tmp_path, monkeypatch, spec, step.step_s)
  table = cost.load(_table(tmp_path, {"v5p": {"spot": 2.37, "on-demand": 5.0}}))
  out = []
  monkeypatch.setenv("PATH", str(tmp_path))  # nothing may run: no gcloud, no pip
  assert jobs.submit(spec, dry_run=True, prices=table, log=out.append) == exit_codes.OK
  # Computed here, independently of launch/cost.py: v5p-32 is 16 chips; two slices.
  chips, steps, price = 16 * 2, 123457, 2.37
  chip_hours = chips * (1.13 + 0.27 + 0.04) * steps / 3600
  text = "\n".join(out)
  rows = _rows(text)
  assert rows["slices"].startswith("2 x v5p-32 (v5p:2x2x4)")
  assert rows["chips"].startswith("32 ") and rows["hosts"].startswith("8 ")
  assert rows["steps"] == str(steps)
  assert _number(rows["step time"]) == pytest.approx(1.44, rel=1e-3)
  assert _number(rows["chip-hours"].split("= ")[-1]) == pytest.approx(chip_hours, rel=1e-3)
  assert _number(rows["cost"]) == pytest.approx(chip_hours * price, abs=0.006)
  assert "EUR" in rows["cost"] and "2026-11-30" in rows["cost"] and "a test" in rows["cost"]
  # The summary opens the plan, before the per-host detail.
  assert text.index("# plan") < text.index("# each host's environment and command")
  assert not (tmp_path / "run").exists()


def test_without_a_fit_check_the_cost_says_why_it_is_unknown(tmp_path, monkeypatch):
  monkeypatch.setattr(preflight, "store_check", lambda spec: [])
  table = cost.load(_table(tmp_path, {"v5p": {"spot": 2.0}}))
  out = []
  assert jobs.submit(_spec(tmp_path), dry_run=True, skip_fit_check=True, prices=table,
                     log=out.append) == exit_codes.OK
  rows = _rows("\n".join(out))
  assert rows["step time"] == "not predicted: no fit check (--skip_fit_check)"
  assert rows["cost"] == "not estimated: no fit check (--skip_fit_check)"


def test_a_price_table_without_the_targets_chip_is_one_error_line_and_exit_2(tmp_path):
  table = _table(tmp_path, {"v5p": {"on-demand": 4.0}, "v5e": {"spot": 1.0}})
  env = {**os.environ, "PYTHONPATH": ROOT, "RG_LAUNCH_CACHE": str(tmp_path / "cache")}
  res = subprocess.run(
      [sys.executable, "-m", "launch.submit", "--config=configs/tiny.py", "--target=v5p-8",
       "--capacity=spot", f"--workdir={tmp_path / 'run'}", "--allow_local_workdir",
       "--zone=us-east5-a", "--project=p",
       f"--prices={table}", "--dry_run"], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  assert res.returncode == exit_codes.USER_ERROR, res.stderr
  errors = [l for l in res.stderr.splitlines() if l.strip()]
  assert len(errors) == 1 and errors[0].startswith("error: the price table"), res.stderr
  assert "no price for v5p spot" in errors[0] and "v5p on-demand" in errors[0]
  assert "fit check" not in res.stdout  # refused before any compile
  assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------ progress


def test_progress_lines_come_at_least_every_interval_and_quote_the_newest_heartbeat(tmp_path):
  """A job that compiles for 6 minutes (one heartbeat) then trains (a heartbeat every 5 s), looked at
  every 0.5 s on a simulated clock: one line per 30 s, each with the heartbeat and loss of its time."""
  wd = str(tmp_path)
  now = [1000.0]
  beats = [(1000.0 + 2, 0, "compiling", None)] + [
      (1000.0 + 360 + 5 * k, 10 * k, "training", 0.5) for k in range(60)]
  losses = {10 * k: 5.0 - 0.01 * k for k in range(60)}

  def reader(workdir):
    current = [b for b in beats if b[0] <= now[0]]
    if not current:
      return progress.Snapshot(0, "", None, None, None)
    t, step, phase, step_time = current[-1]
    return progress.Snapshot(step, phase, step_time, losses.get(step) if step else None, t)

  lines = []
  reporter = progress.Reporter(wd, 600, 30.0, lines.append, clock=lambda: now[0], reader=reader)
  polls = 0
  while now[0] < 1000.0 + 360 + 5 * 60:
    reporter.poll(restarts=1)
    now[0] += 0.5
    polls += 1
  total = 360 + 5 * 60
  assert len(lines) == -(-total // 30)  # a line at the first look, then one per 30 s, no more
  for i, text in enumerate(lines):
    t = 1000.0 + 30 * i
    current = [b for b in beats if b[0] <= t]
    if not current:
      assert text.startswith("progress: step 0/600 (no heartbeat yet)")
      continue
    _, step, phase, _ = current[-1]
    assert text.startswith(f"progress: step {step}/600 ({phase})"), text
    assert text.endswith("ago") and "restarts 1" in text
    if step:
      assert f"loss {losses[step]:.4g}" in text and f"ETA {progress._clock((600 - step) * 0.5)}" in text


def test_progress_reads_the_first_process_heartbeat_and_metrics(tmp_path):
  wd = str(tmp_path)
  assert progress.read(wd) == progress.Snapshot(0, "", None, None, None)
  (tmp_path / "metrics.jsonl").write_text(
      json.dumps({"step": 10, "split": "train", "loss": 4.25, "step_time": 0.2}) + "\n"
      + json.dumps({"step": 10, "split": "eval", "loss": 9.0}) + "\n")
  assert progress.read(wd) == progress.Snapshot(10, "", 0.2, 4.25, None)
  hb = heartbeat.Heartbeat(wd, 0)
  hb.beat("training", 12, 0.25)
  snap = progress.read(wd)
  assert (snap.step, snap.phase, snap.step_time, snap.loss) == (12, "training", 0.25, 4.25)
  assert progress.line(snap, 20, 2, snap.beat_time + 3) == (
      "progress: step 12/20 (training), loss 4.25, 0.25 s/step, ETA 0m02s, restarts 2, "
      "heartbeat 3s ago")


# ------------------------------------------------------------------------------------ sweeps


def test_sweep_dry_run_prints_each_trials_cost_and_the_total(tmp_path, monkeypatch):
  from launch.sweep import definition
  from launch.sweep import dryrun
  from launch.sweep import targets as targets_lib
  trials = definition.expand(definition.load_sweep("configs/sweeps/cpu_ladder.py"))[:3]
  # The planner's predicted step per trial; v5p-8 (4 chips) fits only the first trial.
  steps_s = {t.id: planner.StepTime(1e-3 * (i + 1), 2e-3 * (i + 1), 1e-4, 0.0, 0.0, True).step_s
             for i, t in enumerate(trials)}
  seen = []

  def fake_check(trial, target, log, num_slices):
    seen.append((trial.id, target.accelerator_type, num_slices))
    fits = target.chips == 8 or trial.id == trials[0].id
    return preflight.FitCheck(fits, "total 9 GiB" if fits else "total 120 GiB", step_s=steps_s[trial.id])

  monkeypatch.setattr(targets_lib, "check_trial", fake_check)
  table = cost.load(_table(tmp_path, {"v5p": {"spot": 3.5}}))
  out = []
  rc = dryrun.dry_run(trials, backend="tpu_vm", target="", candidates=["v5p-16", "v5p-8"],
                      launch_flags=["--capacity=spot", "--num_slices=2"], prices=table,
                      log=out.append)
  assert rc == exit_codes.OK
  total_hours = 0.0
  for i, t in enumerate(trials):
    chips = (4 if i == 0 else 8) * 2  # the smallest fitting candidate, two slices each
    hours = chips * (2e-3 * (i + 1) + 1e-4) * t.info["steps"] / 3600
    total_hours += hours
    line = next(l for l in out if l.startswith(f"trial {t.id}"))
    assert f"2 x {'v5p-8' if i == 0 else 'v5p-16'}," in line
    assert _number(line.split(" = ")[1]) == pytest.approx(hours, rel=1e-3)
    assert _number(line.split(" = ")[2]) == pytest.approx(hours * 3.5, abs=0.006)
  total = out[-1]
  assert total.startswith("total: ")
  assert _number(total[len("total: "):]) == pytest.approx(total_hours, rel=1e-3)
  assert _number(total.split(", ")[1]) == pytest.approx(total_hours * 3.5, abs=0.006)
  assert all(n == 2 for _, _, n in seen) and not (tmp_path / "root").exists()


def test_sweep_dry_run_refuses_a_table_without_a_candidates_chip_before_compiling(tmp_path,
                                                                                  monkeypatch):
  from launch.sweep import definition
  from launch.sweep import dryrun
  from launch.sweep import targets as targets_lib
  monkeypatch.setattr(targets_lib, "check_trial", lambda *a: pytest.fail("compiled"))
  trials = definition.expand(definition.load_sweep("configs/sweeps/cpu_ladder.py"))[:1]
  table = cost.load(_table(tmp_path, {"v5p": {"spot": 3.5}}))
  with pytest.raises(exit_codes.UserError, match="no price for v6e spot"):
    dryrun.dry_run(trials, backend="gke", target="", candidates=["v5p-8", "v6e-8"],
                   launch_flags=["--capacity=spot"], prices=table, log=lambda s: None)


@pytest.mark.slow  # one real trainer start (~1 min on 2 busy cores)
def test_a_local_submit_prints_progress_while_it_compiles_and_trains(tmp_path):
  """Progress lines from the first process's heartbeat and metrics, while the heartbeat says
  compiling (held for 6 s by the phase-delay hook) and while it trains."""
  from test_train_common import REPO, SMALL, subprocess_env
  steps, workdir = 120, tmp_path / "run"
  overrides = {**SMALL, "train.steps": steps, "train.log_every": 10, "checkpoint.save_every": 1000}
  argv = ([sys.executable, "-m", "launch.submit", "--backend=local", "--num_processes=1",
           "--config=configs/tiny.py", f"--workdir={workdir}", "--skip_fit_check",
           "--progress_every=1"] + [f"--config.{k}={v}" for k, v in overrides.items()])
  env = {**subprocess_env(num_devices=1), "RECURRENTGEMMA_TPU_PHASE_DELAY": "compiling=6"}
  res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  lines = [l for l in res.stdout.splitlines() if l.startswith("progress: ")]
  parsed = [re.match(r"progress: step (\d+)/(\d+) \(([a-z ]+)\)", l) for l in lines]
  assert all(parsed), lines
  assert all(int(m.group(2)) == steps for m in parsed)
  # 6 s in "compiling" at one line a second: several lines say so (>= 3 leaves room for a busy host).
  assert sum(m.group(3) == "compiling" for m in parsed) >= 3, lines
  step_seq = [int(m.group(1)) for m in parsed]
  assert step_seq == sorted(step_seq) and step_seq[-1] <= steps
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = {int(r["step"]): r["loss"] for r in records if r.get("split") == "train"}
  with_loss = [(int(m.group(1)), re.search(r", loss ([^,]+),", l)) for m, l in zip(parsed, lines)]
  quoted = [(s, x.group(1)) for s, x in with_loss if x]
  assert quoted, lines  # training was long enough to show a loss
  for step, loss in quoted:  # the loss of a training record at or before the heartbeat's step
    assert loss in {f"{v:.4g}" for s, v in train.items() if s <= step}, (step, loss, train)
  assert all("restarts 0" in l for l in lines)


def test_progress_takes_the_newer_step_of_heartbeat_and_metrics(tmp_path):
  wd = str(tmp_path)
  heartbeat.Heartbeat(wd, 0).beat("training", 1, 0.3)
  (tmp_path / "metrics.jsonl").write_text(
      json.dumps({"step": 10, "split": "train", "loss": 6.5, "step_time": 0.2}) + "\n")
  snap = progress.read(wd)
  assert (snap.step, snap.loss, snap.step_time) == (10, 6.5, 0.3)


def test_fit_finds_the_budget_that_reaches_a_target_loss_and_prices_it():
  import numpy as np
  from launch.sweep import fit
  e, a, alpha = 1.8, 60.0, 0.12
  c = np.geomspace(1e17, 1e22, 10)
  rows = [{"status": "done", "family": "g", "flops": float(ci), "final_eval_loss": float(e + a * ci**-alpha),
           "params": 1e6 * (i + 1), "tokens": 2e7 * (i + 1), "flops_per_token": 6e6 * (i + 1),
           "variables": {}} for i, ci in enumerate(c)]
  entry = fit.fit_sweep(rows, n_bootstrap=2, n_starts=4)["g"]
  target = 2.4
  want = (a / (target - e)) ** (1 / alpha)  # the law's own inverse
  got = fit.flops_for_loss(entry, target)
  assert got == pytest.approx(want, rel=0.02)
  assert fit.flops_for_loss(entry, e - 0.1) is None  # below the irreducible loss: never reached
  table = cost.load(EXAMPLE)
  t = spec_lib.parse_target("v5p-256")
  priced = cost.compute_cost(got, t, 2, "spot", 0.4, table)
  hours = got / (459e12 * 0.4) / 3600  # v5p's bf16 peak per chip
  assert priced.chip_hours == pytest.approx(hours, rel=1e-9)
  assert priced.cost == pytest.approx(hours * table.price("v5p", "spot"), rel=1e-9)
  assert priced.duration_s == pytest.approx(hours * 3600 / 256, rel=1e-9)
  with pytest.raises(ValueError, match="no price for v5p best-effort"):
    cost.compute_cost(got, t, 1, "best-effort", 0.4, table)
  with pytest.raises(ValueError, match=r"--mfu=1.5 must be in \(0, 1\]"):
    cost.compute_cost(got, t, 1, "spot", 1.5, table)


@pytest.mark.slow  # one real ahead-of-time compile for v5p:2x2x1 (~50 s on 2 busy cores)
@pytest.mark.tpu_compile
def test_a_real_dry_run_streams_the_fit_check_and_prices_the_planners_step_time(tmp_path):
  from test_train_common import REPO, subprocess_env
  table = _table(tmp_path, {"v5p": {"on-demand": 4.4}})
  cache = tmp_path / "cache"
  env = {**subprocess_env(num_devices=1), "RG_LAUNCH_CACHE": str(cache)}
  argv = [sys.executable, "-m", "launch.submit", "--config=configs/tiny.py", "--target=v5p-8",
          f"--workdir={tmp_path / 'run'}", "--allow_local_workdir", "--zone=z", "--project=p",
          f"--prices={table}", "--dry_run", "--config.train.steps=98765"]
  res = subprocess.run(argv, cwd=REPO, env={**env, "PATH": os.path.dirname(sys.executable)},
                       capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  out = res.stdout
  # The compile's own lines came through the stream, before the plan.
  assert "  | compiling for v5p:2x2x1 x 1 slice(s) with the TPU compiler ..." in out
  assert out.index("  | FITS: yes") < out.index("# plan")
  (verdict,) = [json.loads(p.read_text()) for p in cache.iterdir() if p.suffix == ".json"]
  step_s = verdict["step_s"]  # what the planner's step-time model said for the compiled program
  assert step_s > 0 and f"estimated step time {step_s * 1e3:.1f} ms" in out
  rows = _rows(out)
  chip_hours = 4 * step_s * 98765 / 3600  # v5p-8: 4 chips, one slice
  assert _number(rows["chip-hours"].split("= ")[-1]) == pytest.approx(chip_hours, rel=1e-3)
  assert _number(rows["cost"]) == pytest.approx(chip_hours * 4.4, abs=0.006)


def test_sweep_fit_prints_the_budget_and_cost_to_reach_a_target_loss(tmp_path):
  """Through the command: results from a known law, --target_loss with a price table."""
  e, a, alpha = 1.8, 60.0, 0.12
  root = tmp_path / "root"
  root.mkdir()
  with open(root / "results.jsonl", "w") as f:
    for i, c in enumerate([10 ** (17 + 0.5 * k) for k in range(10)]):
      f.write(json.dumps({"status": "done", "family": "g", "flops": c,
                          "final_eval_loss": e + a * c**-alpha, "params": 1e6 * (i + 1),
                          "tokens": 2e7 * (i + 1), "flops_per_token": 6e6 * (i + 1),
                          "variables": {}}) + "\n")
  table = _table(tmp_path, {"v5p": {"spot": 2.5}})
  env = {**os.environ, "PYTHONPATH": ROOT}
  res = subprocess.run(
      [sys.executable, "-m", "launch.sweep", "fit", "--sweep=configs/sweeps/cpu_ladder.py",
       f"--root={root}", "--bootstrap=2", "--starts=4", "--target_loss=2.1", f"--prices={table}",
       "--target=v5p-256", "--mfu=0.4", "--capacity=spot", "--num_slices=2"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  (line,) = [l for l in res.stdout.splitlines() if l.startswith("target loss 2.1 g: ")]
  flops = float(re.search(r"C=(\S+) FLOPs", line).group(1))
  assert flops == pytest.approx((a / (2.1 - e)) ** (1 / alpha), rel=0.02)
  hours = flops / (459e12 * 0.4) / 3600
  assert _number(line.split(") = ")[1]) == pytest.approx(hours, rel=1e-3)
  assert _number(line.split(" = ")[-1]) == pytest.approx(hours * 2.5, rel=1e-3)
  assert "on 2 x v5p-256" in line
