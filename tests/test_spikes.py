"""Loss-spike recovery (recurrentgemma_tpu/spikes.py and the trainer's rollback).

Fast: the rule against hand-computed medians, the training step -> data step map against hand-worked
rollbacks, the budget, the durable record, the config checks. Slow: a spike injected as a damaged
prepared store (random rare tokens in every row of two known data steps) is detected, rolled back and
skipped; a trainer SIGKILLed after the first rollback, re-run with a budget of one (exit 3 at the
second spike), then with the budget raised, ends on the same parameters bit for bit.
"""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess

import jax
import numpy as np
import pytest

from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import experiment as experiment_lib
from recurrentgemma_tpu import goodput as goodput_lib
from recurrentgemma_tpu import metrics as metrics_lib
from recurrentgemma_tpu import spikes
from recurrentgemma_tpu import trainer
from recurrentgemma_tpu import workdir as workdir_lib
from recurrentgemma_tpu.checkpoints import manager as ckpt
from test_train_common import REPO, small_config, subprocess_env, train_command, wait_for

RULE = spikes.SpikeConfig(enabled=True, factor=2.0, consecutive=2, window=4, max_rollbacks=2)


# ---------------------------------------------------------------------------- the rule


def _feed(detector, losses, first_step=1):
  found = []
  for i, loss in enumerate(losses):
    spike = detector.observe(first_step + i, loss, 1.0)
    if spike is not None:
      found.append(spike)
  return found


def test_rule_fires_after_m_consecutive_losses_above_k_times_the_running_median():
  d = spikes.Detector(RULE)
  # Steps 1-4 fill the window (no check before). Step 5: median(5, 4, 6, 3) = 4.5, 9.5 > 9.0 is a
  # candidate (streak 1). Step 6: median(4, 6, 3, 9.5) = 5.0, 10.5 > 10.0: streak 2 = a spike
  # whose first bad step is 5.
  assert _feed(d, [5.0, 4.0, 6.0, 3.0, 9.5]) == []
  assert d.streak == 1 and d.losses == [4.0, 6.0, 3.0, 9.5]
  [spike] = _feed(d, [10.5], first_step=6)
  assert (spike.first_bad_step, spike.detected_step) == (5, 6)
  assert "10.5 > 2 x running median 5" in spike.reason


def test_rule_needs_the_steps_in_a_row_and_a_strict_excess():
  d = spikes.Detector(RULE)
  # Step 5: median 4.5, 9.0 is not > 9.0 (no candidate). Step 6: median(4, 6, 3, 9) = 5, 11 > 10
  # (streak 1). Step 7: median(6, 3, 9, 11) = 7.5, 4 resets it. Step 8: median(3, 9, 11, 4) = 6.5,
  # 13.5 > 13 (streak 1). Step 9: median(9, 11, 4, 13.5) = 10, 20.5 > 20: spike from step 8.
  found = _feed(d, [5.0, 4.0, 6.0, 3.0, 9.0, 11.0, 4.0, 13.5])
  assert found == [] and d.streak == 1
  [spike] = _feed(d, [20.5], first_step=9)
  assert (spike.first_bad_step, spike.detected_step) == (8, 9)


def test_non_finite_loss_or_gradient_norm_is_a_spike_at_once_even_before_the_window_fills():
  d = spikes.Detector(RULE)
  assert d.observe(1, 5.0, 1.0) is None
  spike = d.observe(2, float("nan"), 1.0)
  assert (spike.first_bad_step, spike.detected_step) == (2, 2) and "loss is nan" in spike.reason
  spike = spikes.Detector(RULE).observe(3, 5.0, float("inf"))
  assert spike.first_bad_step == 3 and "grad_norm is inf" in spike.reason


def test_rule_state_round_trips_through_json_as_a_checkpoint_stores_it():
  losses = [5.0, 4.0, 6.0, 3.0, 9.5]
  whole = spikes.Detector(RULE)
  _feed(whole, losses)
  saved = json.loads(json.dumps(whole.state()))
  resumed = spikes.Detector(RULE, saved)
  assert _feed(resumed, [10.5], 6) == _feed(whole, [10.5], 6) != []


def test_a_smaller_window_on_resume_keeps_the_newest_losses():
  d = spikes.Detector(dataclasses.replace(RULE, window=2), {"losses": [1.0, 2.0, 3.0], "streak": 0})
  assert d.losses == [2.0, 3.0]


# ---------------------------------------------------------------------------- the data map


def _rb(restored, skip_from, skip_to, detected=0):
  return spikes.Rollback(restored_step=restored, skip_from=skip_from, skip_to=skip_to,
                         first_bad_step=detected, detected_step=detected, reason="test")


def test_data_step_map_after_rollbacks_worked_by_hand():
  assert [spikes.data_step([], s) for s in (0, 7)] == [0, 7]
  # Restored 4, data 4..7 skipped: steps 0-3 read 0-3, step 4 reads 8.
  one = [_rb(4, 4, 7)]
  assert [spikes.data_step(one, s) for s in range(7)] == [0, 1, 2, 3, 8, 9, 10]
  # Then restored 6 (which read data 10), data 10..12 skipped: step 6 reads 13.
  two = one + [_rb(6, 10, 12)]
  assert [spikes.data_step(two, s) for s in range(8)] == [0, 1, 2, 3, 8, 9, 13, 14]
  # Then restored 2, before both: data 2..14 skipped (trained, or skipped before): step 2 reads 15.
  three = two + [_rb(2, 2, 14)]
  assert [spikes.data_step(three, s) for s in range(5)] == [0, 1, 15, 16, 17]


def test_a_rollback_that_does_not_follow_the_map_is_refused():
  with pytest.raises(ValueError, match="training step 6 read data step 10"):
    spikes.offsets([_rb(4, 4, 7), _rb(6, 6, 9)])


# ---------------------------------------------------------------------------- plan, budget, record


def test_plan_restores_the_newest_checkpoint_measured_good_and_skips_what_was_trained_since(tmp_path):
  rec = spikes.Recovery.resume(RULE, str(tmp_path), None, write=True)
  # First bad logged step 9: its loss came from parameters after update 8, made from batch 7; the
  # checkpoint at 7 gave the good loss of step 8, so 8 is not trusted and 7 is the newest good one.
  rb = rec.plan(spikes.Spike(9, 10, "x"), [2, 4, 7, 8, 9])
  assert (rb.restored_step, rb.skip_from, rb.skip_to) == (7, 7, 9)
  rec.record(rb)
  assert rec.data_step(7) == 10 and rec.data_step(6) == 6
  on_disk = json.loads((tmp_path / workdir_lib.SPIKES_FILE).read_text())
  assert on_disk["rollbacks"][0]["restored_step"] == 7 and on_disk["rollbacks"][0]["skip_to"] == 9
  assert rec.meta(8)["next_data_step"] == 11
  # The second spike: restored 4 (the map read data 4 there), skip 4 .. the data of step 11 (14).
  rb2 = rec.plan(spikes.Spike(7, 12, "y"), [2, 4, 7])
  assert (rb2.restored_step, rb2.skip_from, rb2.skip_to) == (4, 4, 14)
  rec.record(rb2)
  with pytest.raises(spikes.SpikeStop) as stop:
    rec.plan(spikes.Spike(20, 20, "loss is nan"), [4, 16])
  message = str(stop.value)
  assert "config.spikes.max_rollbacks=2) is spent" in message
  assert "1. spike at step 9 (x): restored step 7, skipped data steps 7-9" in message
  assert "2. spike at step 7 (y): restored step 4, skipped data steps 4-14" in message
  assert exit_codes.for_exception(stop.value) == exit_codes.NON_FINITE == 3


def test_no_checkpoint_before_the_spike_stops_with_exit_3(tmp_path):
  rec = spikes.Recovery.resume(RULE, str(tmp_path), None, write=True)
  with pytest.raises(spikes.SpikeStop, match=r"no checkpoint at or before step 2 to roll back to"):
    rec.plan(spikes.Spike(4, 4, "loss is nan"), [3, 4])
  zero = spikes.Recovery.resume(dataclasses.replace(RULE, max_rollbacks=0), str(tmp_path), None,
                                write=True)
  with pytest.raises(spikes.SpikeStop, match=r"max_rollbacks=0\) is spent. Rollbacks so far: none"):
    zero.plan(spikes.Spike(9, 9, "loss is nan"), [4])


def _meta(rollbacks, losses=(1.0,)):
  return {"step": 8, "spikes": {"rollbacks": [dataclasses.asdict(r) for r in rollbacks],
                                "detector": {"losses": list(losses), "streak": 0}}}


def test_resume_takes_the_longer_record_of_file_and_checkpoint_and_refuses_two_runs(tmp_path):
  first, second = _rb(4, 4, 7, 9), _rb(6, 10, 12, 11)
  # Killed after the second rollback's file write, before any later save: the file is one longer.
  (tmp_path / workdir_lib.SPIKES_FILE).write_text(json.dumps(
      {"rollbacks": [dataclasses.asdict(first), dataclasses.asdict(second)]}))
  rec = spikes.Recovery.resume(RULE, str(tmp_path), _meta([first], losses=(3.0, 4.0)), write=False)
  assert rec.rollbacks == [first, second] and rec.data_step(6) == 13
  assert rec.detector.losses == [3.0, 4.0]
  # The file lost: the checkpoint's copy still gives the map.
  os.remove(tmp_path / workdir_lib.SPIKES_FILE)
  assert spikes.Recovery.resume(RULE, str(tmp_path), _meta([first]), write=False).rollbacks == [first]
  # Records that are not one the prefix of the other belong to two runs.
  (tmp_path / workdir_lib.SPIKES_FILE).write_text(json.dumps(
      {"rollbacks": [dataclasses.asdict(_rb(2, 2, 3, 5))]}))
  with pytest.raises(exit_codes.UserError, match="mixes two runs"):
    spikes.Recovery.resume(RULE, str(tmp_path), _meta([first]), write=False)


def test_missing_rollback_records_are_found_in_the_metrics_text(tmp_path):
  first, second = _rb(4, 4, 7, 9), _rb(4, 8, 12, 9)
  rec = spikes.Recovery(RULE, str(tmp_path), [first, second], None, write=False)
  text = json.dumps({"step": 4, "split": "rollback", **first.scalars()}) + "\n"
  assert rec.missing_records(text) == [second]


@pytest.mark.parametrize("field, value, match", [
    ("factor", 1.0, r"config.spikes.factor=1.0 must be > 1"),
    ("consecutive", 0, r"config.spikes.consecutive=0 must be >= 1"),
    ("window", 0, r"config.spikes.window=0 must be >= 1"),
    ("max_rollbacks", -1, r"config.spikes.max_rollbacks=-1 must be >= 0"),
])
def test_bad_spike_settings_are_refused_naming_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    experiment_lib.build(small_config(**{f"spikes__{field}": value}))


def test_a_typo_in_the_spikes_group_names_the_field():
  config = small_config()
  with pytest.raises(ValueError, match=r"config.spikes.facter .*did you mean config.spikes.factor"):
    experiment_lib.apply_overrides(config, ["spikes.facter=2"])


# ---------------------------------------------------------------------------- end to end (slow)

# Two damaged data steps. Data step 8 is the batch of training step 8, whose loss is logged at step 9:
# the rule fires there (first bad 9), restores step 4 (the newest checkpoint <= 7) and skips data
# 4..8, setting aside checkpoint 8. Training step s >= 4 then reads data s + 5, so training step 8
# reads data 13, the second damaged one: logged step 9 again, restored 4 again, data 9..13 skipped,
# and steps 4..11 read data 14..21. The window is 5 so that a run resumed at step 4 judges step 9
# only with the losses its checkpoint saved.
DAMAGED = (8, 13)
STEPS = 12
SPIKY = dict(train__steps=STEPS, checkpoint__save_every=4, spikes__enabled=True,
             spikes__factor=1.1, spikes__consecutive=1, spikes__window=5, spikes__max_rollbacks=2)
EXPECTED = [(4, 4, 8), (4, 9, 13)]  # (restored_step, skip_from, skip_to) of each rollback


def _damaged_store(root) -> str:
  """A copy of SMALL's prepared store whose rows of the DAMAGED data steps hold random tokens drawn
  from the rarer half of the vocabulary (a corrupted shard, as a real spike's cause might be)."""
  exp = experiment_lib.build(small_config())
  from recurrentgemma_tpu import data as data_lib  # pylint: disable=g-import-not-at-top
  pipeline = data_lib.make_pipeline(exp.data)
  store = pipeline.stores[0]
  [part] = store.train.parts
  dst = os.path.join(root, os.path.basename(store.directory))
  shutil.copytree(store.directory, dst)
  rows = np.memmap(os.path.join(dst, os.path.basename(part.path)), part.dtype, "r+",
                   shape=(part.num_rows,))
  counts = np.bincount(np.asarray(rows["targets"]).ravel(), minlength=exp.model.vocab_size)
  rare = np.argsort(counts, kind="stable")[:exp.model.vocab_size // 2]
  rng = np.random.default_rng(0)
  batch = exp.data.global_batch_size
  for k in DAMAGED:
    _, idx = pipeline.source_of(k * batch + np.arange(batch))
    targets = rows["targets"]
    targets[idx] = rng.choice(rare, size=(batch, exp.data.seq_len)).astype(targets.dtype)
  rows.flush()
  del rows
  pipeline.close()
  return root


def _params(workdir):
  from recurrentgemma_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  plan = experiment_lib.build(small_config())
  abstract = jax.eval_shape(lambda: flax.core.meta.unbox(model_lib.init_params(plan.model,
                                                                              jax.random.key(0))))
  return jax.device_get(ckpt.load_params(str(workdir), abstract))


def _rollbacks(workdir):
  return [(r["restored_step"], r["skip_from"], r["skip_to"])
          for r in metrics_lib.read_metrics(str(workdir), split="rollback")]


def _final_meta(workdir):
  m = ckpt.CheckpointManager(workdir / "checkpoints", ckpt.CheckpointOptions(4, 100, 0, False))
  try:
    return m.read_meta(m.latest_step())
  finally:
    m.close()


@pytest.fixture(scope="module")
def spiky(tmp_path_factory):
  """The damaged store and the uninterrupted run on it (in this process)."""
  store = _damaged_store(str(tmp_path_factory.mktemp("store")))
  workdir = tmp_path_factory.mktemp("spiky")
  exp = experiment_lib.build(small_config(data__store=store, **SPIKY))
  result = trainer.train_and_evaluate(exp, str(workdir))
  return store, workdir, result


@pytest.mark.slow
def test_injected_spikes_are_detected_rolled_back_skipped_and_the_run_finishes(spiky):
  _, workdir, result = spiky
  assert result.status == "completed" and result.step == STEPS
  assert _rollbacks(workdir) == EXPECTED
  records = metrics_lib.read_metrics(str(workdir), split="rollback")
  assert [(r["first_bad_step"], r["detected_step"], r["step"]) for r in records] == [(9, 9, 9)] * 2
  ledger = goodput_lib.read(str(workdir))  # the run's goodput ledger counts both rollbacks
  assert (ledger.rollbacks, ledger.rollback_steps) == (2, 2 * (9 - 4)), ledger.lines()
  recorded = json.loads((workdir / workdir_lib.SPIKES_FILE).read_text())["rollbacks"]
  assert [(r["restored_step"], r["skip_from"], r["skip_to"]) for r in recorded] == EXPECTED
  meta = _final_meta(workdir)["spikes"]
  assert meta["rollbacks"] == recorded and meta["next_data_step"] == STEPS + 10
  # The rule's state is saved with the checkpoint: a run resumed at step 4 has the 5 losses it
  # needs to judge step 9 (the chain below would miss the spike without them).
  assert len(meta["detector"]["losses"]) == 5
  # The abandoned trajectories' step 8 was set aside (twice), never deleted.
  assert sorted(p.split(".")[0] for p in os.listdir(workdir / "checkpoints_rolled_back")) == ["8", "8"]
  # The last record of each step is the final trajectory's.
  final = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(workdir))}
  assert all(math.isfinite(v) for v in final.values()) and len(final) == STEPS


def _start(workdir, store, **overrides):
  return subprocess.Popen(train_command(str(workdir), data__store=store, **{**SPIKY, **overrides}),
                          cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_sigkill_after_a_rollback_then_the_budget_then_more_budget_reproduce_the_run(spiky, tmp_path):
  store, reference, _ = spiky
  # 1. A real trainer SIGKILLed as soon as its first rollback is recorded (before its next save).
  proc = _start(tmp_path, store)
  wait_for(lambda: os.path.exists(tmp_path / workdir_lib.SPIKES_FILE), proc, 600, "the first rollback")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  # 2. Re-run with a budget of one: it applies the recorded skip (no second rollback for the first
  # spike: it trains on to step 8, which read data step 13 under the skip), meets the second spike
  # and stops with exit 3, naming the spent budget and the one rollback.
  proc = _start(tmp_path, store, spikes__max_rollbacks=1)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == exit_codes.NON_FINITE, out[-4000:]
  last = out.strip().splitlines()[-1]
  assert "the rollback budget (config.spikes.max_rollbacks=1) is spent" in last, out[-4000:]
  assert "1. spike at step 9" in last and "restored step 4, skipped data steps 4-8" in last, last
  assert _rollbacks(tmp_path) == EXPECTED[:1]
  assert _final_meta(tmp_path)["spikes"]["next_data_step"] == 13
  # 3. The budget raised (spikes.* may change on resume), the run rolls back the second spike
  # exactly where the uninterrupted run did and ends on the same parameters, bit for bit.
  proc = _start(tmp_path, store)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0 and "Resumed from" in out, out[-4000:]
  assert _rollbacks(tmp_path) == EXPECTED, out[-4000:]
  assert _final_meta(tmp_path)["spikes"]["rollbacks"] == _final_meta(reference)["spikes"]["rollbacks"]
  jax.tree.map(np.testing.assert_array_equal, _params(tmp_path), _params(reference))
