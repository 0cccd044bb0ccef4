"""The goodput ledger: its arithmetic on hand-made records, the recorder, sweep totals and
`launch.status --goodput`. The ledger of a real 2-process local job, preempted, killed and hung,
which must add up to the measured wall-clock time and count exactly the steps that were trained
twice, is checked in tests/test_launch_local.py (slow), with that job's other checks."""

import json
import re
import subprocess
import sys
import time

import pytest

from launch import spec as spec_lib
from launch import state as launch_state
from launch.sweep import report
from recurrentgemma_tpu import goodput
from recurrentgemma_tpu import heartbeat

# ------------------------------------------------------------------------------------ arithmetic


def _launched_run():
  """Three attempts: preempted (saved at 6), killed while training past 11, then completed.

  Times in seconds; the expected ledger below is worked out by hand from these marks.
  """
  events = [{"time": 0, "event": "submitted"}, {"time": 2, "event": "started"},
            {"time": 30, "event": "preempted"}, {"time": 31, "event": "started"},
            {"time": 60, "event": "failed"}, {"time": 62, "event": "started"},
            {"time": 100, "event": "done"}]

  def phase(t, p, step, **kw):
    return {"t": t, "kind": "phase", "phase": p, "step": step, **kw}

  def step(t, s, **kw):
    return {"t": t, "kind": "step", "step": s, **kw}

  records = [
      # attempt 1: process up at 3, compiles 10-14 (1 s of it fetching data), saves twice.
      {"t": 3.5, "kind": "start", "process_start": 3}, phase(4, "starting", 0),
      phase(10, "compiling", 0), phase(14, "training", 1, data_s=1.0),
      step(16, 2, data_s=0.5), step(20, 4, data_s=1.0), phase(20, "saving", 4),
      phase(22, "training", 5), step(24, 6), phase(24, "saving", 6), {"t": 27, "kind": "exit"},
      # attempt 2: resumes at 6, trains to 11, SIGKILLed (the launcher sees it at 60).
      {"t": 32, "kind": "start", "process_start": 31.5}, phase(33, "starting", 0),
      phase(40, "compiling", 6), phase(44, "training", 7), step(46, 8), step(50, 10), step(52, 11),
      # attempt 3: resumes at 8 (steps 9-11 are trained again), saves, evaluates, exits.
      {"t": 63, "kind": "start", "process_start": 62.5}, phase(64, "starting", 0),
      phase(70, "compiling", 8), phase(72, "training", 9), step(80, 12), phase(80, "saving", 12),
      phase(85, "evaluating", 12), phase(95, "done", 12), {"t": 96, "kind": "exit"},
  ]
  return records, events


def test_a_launched_run_s_time_is_split_by_hand_computed_marks():
  records, events = _launched_run()
  ledger = goodput.compute(records, events)
  expected = {
      "queued": 2 + 1 + 2,  # submit -> start, and the two gaps before a restart
      "startup": 8 + 9 + 8,  # attempt start -> compiling
      "compile": 3 + 4 + 2,  # compiling -> training, less the data fetch inside it
      "data_wait": 1.0 + 0.5 + 1.0,
      # kept training: 14-16 and 16-20 less data, 22-24, attempt 2's 44-46 (steps 7-8), 72-80
      "productive": 1.5 + 3 + 2 + 2 + 8,
      "checkpoint": 2 + 3 + 5,
      "evaluation": 10,
      # the killed attempt's unrecorded tail 52-60, and its steps 9-11 (46-52) redone by attempt 3
      "work_lost": 8 + 6,
      "other": 3 + 1 + 4,  # exit -> the launcher's event
  }
  assert ledger.seconds == pytest.approx(expected)
  assert (ledger.start, ledger.end, ledger.wall_clock_s) == (0, 100, 100)
  assert sum(ledger.seconds.values()) == pytest.approx(100)
  assert (ledger.work_lost_steps, ledger.productive_steps, ledger.attempts) == (3, 12, 3)
  assert ledger.goodput == pytest.approx(0.165)
  # A process start read as earlier than the killed attempt's end (a coarse or skewed clock) must
  # not take the killed process's tail from work lost.
  skewed = [dict(r, process_start=59) if r["t"] == 63 else r for r in records]
  assert goodput.compute(skewed, events).seconds == pytest.approx(expected)
  # Two runs by hand inside one process (a notebook): the second start record names the process's
  # start again, long before the first run's records; the second run starts after the first.
  by_hand = [r for r in records if r["t"] < 28] + [
      {"t": 40, "kind": "start", "process_start": 3}, {"t": 40, "kind": "phase", "phase": "starting",
                                                       "step": 0}, {"t": 50, "kind": "exit"}]
  again = goodput.compute(by_hand)
  assert (again.start, again.end, again.attempts) == (3, 50, 2)
  assert again.seconds["startup"] == pytest.approx(7 + 10)
  assert again.seconds["other"] == pytest.approx(13)  # between the first run's exit and the second
  # A live run's window ends now: the time since the last mark goes on in its category.
  live = goodput.compute(records[:-3], events[:-1], end=90)
  assert live.end == 90 and live.seconds["checkpoint"] == pytest.approx(2 + 3 + 5 + 5)
  assert sum(live.seconds.values()) == pytest.approx(90)


def test_the_time_before_a_resubmission_is_not_queueing():
  events = [{"time": 0, "event": "submitted"}, {"time": 1, "event": "started"},
            {"time": 5, "event": "failed"}, {"time": 50, "event": "resubmitted"},
            {"time": 50, "event": "submitted"}, {"time": 51, "event": "started"},
            {"time": 60, "event": "done"}]
  ledger = goodput.compute([], events)
  assert ledger.seconds == {**dict.fromkeys(goodput.CATEGORIES, 0.0), "queued": 1 + 1,
                            "startup": 4 + 9, "other": 45}
  assert ledger.attempts == 2


def test_a_rollback_throws_away_the_steps_after_the_restored_one():
  records = [
      {"t": 1, "kind": "start", "process_start": 0},
      {"t": 1, "kind": "phase", "phase": "starting", "step": 0},
      {"t": 2, "kind": "phase", "phase": "compiling", "step": 0},
      {"t": 3, "kind": "phase", "phase": "training", "step": 1},
      {"t": 4, "kind": "step", "step": 2}, {"t": 10, "kind": "step", "step": 8},
      {"t": 10, "kind": "rollback", "step": 8, "restored_step": 4},
      {"t": 12, "kind": "step", "step": 6}, {"t": 14, "kind": "step", "step": 8},
      {"t": 15, "kind": "exit"},
  ]
  metrics = [{"step": 8, "split": "rollback", "restored_step": 4, "skip_from": 5, "skip_to": 8}]
  ledger = goodput.compute(records, metrics=metrics)
  # Steps 3-8 took 6 s; 5-8 (two thirds) were thrown away and trained again in 10-14.
  assert ledger.seconds == pytest.approx({**dict.fromkeys(goodput.CATEGORIES, 0.0), "startup": 2,
                                          "compile": 1, "productive": 1 + 2 + 4 + 1,
                                          "work_lost": 4})
  assert (ledger.work_lost_steps, ledger.productive_steps, ledger.attempts) == (4, 8, 1)
  assert (ledger.rollbacks, ledger.rollback_steps) == (1, 4)


def test_rollback_records_show_in_the_ledger_read_from_a_workdir(tmp_path):
  metrics = [{"step": s, "split": "train", "loss": 1.0} for s in range(1, 31)]
  metrics[12:12] = [{"step": 12, "split": "rollback", "restored_step": 8, "skip_from": 9,
                     "skip_to": 12}]
  metrics.append({"step": 30, "split": "rollback", "restored_step": 22, "skip_from": 23,
                  "skip_to": 30})
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
  (tmp_path / "goodput.jsonl").write_text(
      json.dumps({"t": 5.0, "kind": "start", "process_start": 5.0}) + "\n"
      + json.dumps({"t": 9.0, "kind": "exit"}) + "\n" + '{"t": 9.5, "kind": "st')  # torn by a kill
  ledger = goodput.read(str(tmp_path))
  assert (ledger.rollbacks, ledger.rollback_steps) == (2, 4 + 8)
  assert (ledger.start, ledger.end, ledger.seconds["startup"]) == (5.0, 9.0, 4.0)
  assert "  attempts 1, rollbacks 2 (12 steps rolled back)" in ledger.lines()


def test_the_recorder_appends_flushed_records_that_a_reader_sees_before_it_closes(tmp_path):
  clock = iter(float(t) for t in range(100, 200))
  rec = goodput.Recorder(str(tmp_path), enabled=True, clock=lambda: next(clock))
  beat = heartbeat.Heartbeat(str(tmp_path), 0, rec.phase)
  beat.beat("starting", 0)
  beat.beat("compiling", 3)
  with rec.data_wait():
    time.sleep(0.01)
  rec.on_metrics(4, "train", {"loss": 1.0})
  rec.on_metrics(4, "eval", {"loss": 1.0})  # not progress
  rec.on_metrics(4, "rollback", {"restored_step": 2.0, "skip_from": 3.0, "skip_to": 4.0})
  records = goodput.read_records(str(tmp_path))  # the file is still open: every line is on disk
  assert [(r["kind"], r.get("phase"), r.get("step"), r["t"]) for r in records] == [
      ("start", None, None, 100), ("phase", "starting", 0, 101), ("phase", "compiling", 3, 102),
      ("step", None, 4, 103), ("rollback", None, 4, 104)]
  assert records[3]["data_s"] >= 0.01 and records[4]["restored_step"] == 2
  rec.exit()
  assert goodput.read_records(str(tmp_path))[-1] == {"t": 105, "kind": "exit"}
  other = goodput.Recorder(str(tmp_path / "p1"), enabled=False)  # processes other than 0
  other.phase("starting", 0)
  other.exit()
  assert not (tmp_path / "p1").exists()


def test_sweep_totals_are_the_sum_of_the_trials_ledgers(tmp_path):
  records, events = _launched_run()
  one = [{"t": 10, "kind": "start", "process_start": 10},
         {"t": 10, "kind": "phase", "phase": "starting", "step": 0},
         {"t": 16, "kind": "exit"}]
  trial_a, trial_b = tmp_path / "trials" / "a", tmp_path / "trials" / "b"
  for workdir, recs in ((trial_a, records), (trial_b, one)):
    workdir.mkdir(parents=True)
    (workdir / "goodput.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  (trial_a / "launch").mkdir()
  (trial_a / "launch" / "state.json").write_text(json.dumps({"phase": "done", "history": events}))
  trials = [_Trial("a"), _Trial("b"), _Trial("never_ran")]
  lines = report.goodput_total_lines(str(tmp_path), trials)
  assert lines[0] == "sweep goodput over 3 trials:"
  # 100 s + 6 s of wall-clock; 16.5 s productive; 6 s of start-up from trial b.
  assert lines[1].startswith("goodput 15.6% of 1m46s wall-clock")
  assert re.search(r"start-up\s+31\.0s", "\n".join(lines)) and "(3 steps redone)" in lines[9]


def test_launch_status_goodput_shows_the_ledger_of_a_launched_run(tmp_path):
  from test_train_common import REPO  # pylint: disable=g-import-not-at-top
  records, events = _launched_run()
  workdir = str(tmp_path / "run")
  spec = spec_lib.JobSpec(config="configs/tiny.py", overrides=(), workdir=workdir, backend="local",
                          target=None)
  launch_state.save_spec(spec)
  launch_state.save_state(workdir, launch_state.RunState(phase="done", attempt=3, history=events))
  with open(goodput.path(workdir), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))
  out = subprocess.run([sys.executable, "-m", "launch.status", f"--workdir={workdir}", "--goodput"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert "goodput 16.5% of 1m40s wall-clock (1970-01-01 00:00:00 to 1970-01-01 00:01:40 UTC)" in lines
  for line in ("  productive steps        16.5s  16.5%  (12 steps)",
               "  queued                   5.0s   5.0%",
               "  waiting for data         2.5s   2.5%",
               "  work lost               14.0s  14.0%  (3 steps redone)",
               "  attempts 3, rollbacks 0 (0 steps rolled back)"):
    assert line in lines, out.stdout
  plain = subprocess.run([sys.executable, "-m", "launch.status", f"--workdir={workdir}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
  assert plain.returncode == 0 and "goodput" not in plain.stdout


class _Trial:
  def __init__(self, trial_id):
    self.id = trial_id
