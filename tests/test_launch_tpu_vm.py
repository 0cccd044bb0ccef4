"""The tpu_vm backend's babysitter against a fake gcloud on PATH (tests/fake_gcloud.py) that plays
queued-resource states and records every call: state machine, deadlines, deletion, retry budgets,
stop and gc."""

import json
import os
import shutil
import stat

import pytest

from launch import commands
from launch import gcloud
from launch import jobs
from launch import spec as spec_lib
from launch import state as state_lib
from launch.backends import tpu_vm
from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import workdir as workdir_lib

HERE = os.path.dirname(os.path.abspath(__file__))


class FakeCloud:

  def __init__(self, tmp_path, monkeypatch):
    self.dir = tmp_path / "fake"
    self.dir.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "gcloud"
    shutil.copy(os.path.join(HERE, "fake_gcloud.py"), exe)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    self.workdir = str(tmp_path / "run")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_DIR", str(self.dir))
    monkeypatch.setenv("FAKE_GCLOUD_WORKDIR", self.workdir)

  def scenario(self, **steps):
    (self.dir / "scenario.json").write_text(json.dumps(steps))

  def calls(self):
    path = self.dir / "calls.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

  def verbs(self):
    """(verb, resource) of each queued-resource / ssh call, in order."""
    return [(c[4] if c[3] == "queued-resources" else "ssh", c[5]) for c in self.calls()]

  def live(self):
    world = json.loads((self.dir / "world.json").read_text())
    return sorted(n for n, q in world["qrs"].items() if not q["deleted"])


@pytest.fixture
def cloud(tmp_path, monkeypatch):
  return FakeCloud(tmp_path, monkeypatch)


def _spec(cloud, num_slices=1, **budgets):
  b = dict(poll_s=10, queue_timeout_s=0, startup_timeout_s=0, max_preemptions=5, max_failures=2)
  b.update(budgets)
  spec = spec_lib.JobSpec(config="configs/tiny.py", overrides=("train.steps=5",),
                          workdir=cloud.workdir, backend="tpu_vm",
                          target=spec_lib.parse_target("v5p-16"), num_slices=num_slices,
                          capacity="spot", zone="us-east5-a", project="p", allow_local_workdir=True,
                          budgets=spec_lib.Budgets(**b))
  state_lib.save_spec(spec)
  return spec


def _run(spec):
  """Runs the babysitter with a clock that advances by the sleeps only (no real waiting)."""
  now = [1000.0]
  lines = []

  def sleep(s):
    now[0] += s

  rc = tpu_vm.babysit(spec, gcloud.Runner(), "gs://b/wheel.whl", log=lines.append,
                  sleep=sleep, clock=lambda: now[0])
  return rc, state_lib.load_state(spec.workdir), now[0] - 1000.0


def _exits(spec, rc=0):
  return {str(i): rc for i in range(spec.num_hosts)}


def test_queued_then_active_then_done_deletes_the_queued_resource(cloud):
  spec = _spec(cloud)
  name = commands.resource_name(spec, 1)
  cloud.scenario(**{name: ["ACCEPTED", "WAITING_FOR_RESOURCES", "ACTIVE",
                           {"state": "ACTIVE", "exit": _exits(spec)}]})
  rc, st, _ = _run(spec)
  assert rc == 0 and st.phase == "done"
  assert cloud.verbs() == [("create", name)] + [("describe", name)] * 4 + [("delete", name)]
  create = cloud.calls()[0]
  assert f"--node-id={name}" in create and "--spot" in create
  assert f"--labels=rg-backend=tpu-vm,rg-launch={spec.run_id}" in create
  assert "--force" in cloud.calls()[-1]
  assert cloud.live() == []


def test_queue_deadline_deletes_the_waiting_resource_and_fails(cloud):
  spec = _spec(cloud, queue_timeout_s=35)
  name = commands.resource_name(spec, 1)
  cloud.scenario(**{name: ["ACCEPTED", "WAITING_FOR_RESOURCES"]})
  rc, st, elapsed = _run(spec)
  assert rc == exit_codes.INTERNAL and st.phase == "failed"
  assert "queueing deadline" in st.message
  assert 35 < elapsed <= 50  # noticed at the first poll after the deadline (polls every 10 s)
  assert cloud.verbs()[-1] == ("delete", name) and cloud.live() == []
  assert [v for v, _ in cloud.verbs()].count("create") == 1  # capacity is not retried


def test_run_deadline_deletes_the_active_resource(cloud):
  spec = _spec(cloud, run_timeout_s=25)
  name = commands.resource_name(spec, 1)
  cloud.scenario(**{name: ["ACCEPTED", "ACTIVE"]})
  rc, st, _ = _run(spec)
  assert rc == exit_codes.INTERNAL and "running longer than the deadline" in st.message
  assert cloud.live() == []


@pytest.mark.parametrize("lost", ["SUSPENDED", "FAILED", "PREEMPTED"])
def test_preempted_resource_is_deleted_and_recreated_and_the_run_resumes(cloud, lost):
  spec = _spec(cloud)
  first, second = commands.resource_name(spec, 1), commands.resource_name(spec, 2)
  cloud.scenario(**{first: ["ACTIVE", lost],
                    second: ["WAITING_FOR_RESOURCES", {"state": "ACTIVE", "exit": _exits(spec)}]})
  rc, st, _ = _run(spec)
  assert rc == 0 and st.phase == "done"
  assert (st.preemptions, st.failures, st.attempt) == (1, 0, 2)
  verbs = cloud.verbs()
  assert verbs.index(("delete", first)) < verbs.index(("create", second))
  assert cloud.live() == []


def test_preemption_budget_is_separate_and_bounded(cloud):
  spec = _spec(cloud, max_preemptions=2, max_failures=0)
  cloud.scenario(**{commands.resource_name(spec, a): ["SUSPENDED"] for a in (1, 2, 3)})
  rc, st, _ = _run(spec)
  assert rc == exit_codes.PREEMPTED and st.phase == "failed"
  assert st.preemptions == 3 and st.failures == 0  # max_failures=0 did not stop preemption retries
  assert [v for v, _ in cloud.verbs()].count("create") == 3
  assert cloud.live() == []


def test_host_failure_restarts_in_place_then_the_failure_budget_ends_the_run(cloud):
  spec = _spec(cloud, num_slices=2, max_failures=1)
  name = commands.resource_name(spec, 1)
  crash = {"state": "ACTIVE", "exit": {"3": 1}}
  cloud.scenario(**{name: ["ACTIVE", crash, "ACTIVE", crash]})
  rc, st, _ = _run(spec)
  assert rc == exit_codes.INTERNAL and st.failures == 2 and st.preemptions == 0
  ssh = [c for c in cloud.calls() if c[3] == "tpu-vm"]
  # One restart (budget 1), on every worker of both slices.
  assert [c[5] for c in ssh] == [f"{name}-0", f"{name}-1"]
  assert all("--worker=all" in c for c in ssh)
  assert cloud.live() == []


def test_exit_42_on_a_host_counts_as_a_preemption(cloud):
  spec = _spec(cloud)
  name = commands.resource_name(spec, 1)
  cloud.scenario(**{name: [{"state": "ACTIVE", "exit": {"1": 42}},
                           {"state": "ACTIVE", "exit": _exits(spec)}]})
  rc, st, _ = _run(spec)
  assert rc == 0 and (st.preemptions, st.failures) == (1, 0)


@pytest.mark.parametrize("fatal", [2, 3])
def test_user_errors_fail_fast_without_retry(cloud, fatal):
  spec = _spec(cloud)
  name = commands.resource_name(spec, 1)
  cloud.scenario(**{name: [{"state": "ACTIVE", "exit": {"0": fatal}}]})
  rc, st, _ = _run(spec)
  assert rc == fatal and st.phase == "failed" and st.failures == 0
  assert not [c for c in cloud.calls() if c[3] == "tpu-vm"]
  assert cloud.live() == []


def test_stop_file_deletes_and_returns_42(cloud):
  spec = _spec(cloud)
  cloud.scenario(**{commands.resource_name(spec, 1): ["WAITING_FOR_RESOURCES"]})
  state_lib.request_stop(spec.workdir)
  rc, st, _ = _run(spec)
  assert rc == exit_codes.PREEMPTED and st.phase == "stopped" and cloud.live() == []


def test_gc_deletes_leaked_resources_of_the_run_but_not_the_live_one(cloud):
  spec = _spec(cloud)
  runner = gcloud.Runner()
  for attempt in (1, 2, 3):
    runner.run(commands.qr_create(spec, attempt, "/dev/null"))
  other = spec_lib.JobSpec(**{**spec.__dict__, "workdir": spec.workdir + "-other"})
  runner.run(commands.qr_create(other, 1, "/dev/null"))
  st = state_lib.RunState(phase="running", attempt=3, resource=commands.resource_name(spec, 3))
  state_lib.save_state(spec.workdir, st)
  assert jobs.gc(spec.workdir, log=lambda s: None) == 0
  assert cloud.live() == sorted([commands.resource_name(spec, 3), commands.resource_name(other, 1)])
  st.phase = "done"
  state_lib.save_state(spec.workdir, st)
  jobs.gc(spec.workdir, log=lambda s: None)
  assert cloud.live() == [commands.resource_name(other, 1)]


def test_resubmitting_a_different_job_into_the_workdir_is_refused(cloud):
  spec = _spec(cloud)
  changed = spec_lib.JobSpec(**{**spec.__dict__, "overrides": ("model.width=128",)})
  assert jobs.submit(changed, skip_fit_check=True, log=lambda s: None) == exit_codes.USER_ERROR
  assert cloud.calls() == []
  # The launcher and the trainer agree on what changes a job: the trainer resumes a run whose
  # train.steps grew (its COMPATIBLE fields), so the launcher takes it as the same job.
  extended = spec_lib.JobSpec(**{**spec.__dict__, "overrides": ("train.steps=80",)})
  assert spec.same_job(extended) and not spec.same_job(changed)
  added = spec_lib.JobSpec(**{**spec.__dict__, "overrides": spec.overrides + ("data.seed=3",)})
  assert not spec.same_job(added)


def test_startup_deadline_counts_from_active_not_from_queueing(cloud):
  spec = _spec(cloud, startup_timeout_s=30)
  name = commands.resource_name(spec, 1)
  cloud.scenario(**{name: ["WAITING_FOR_RESOURCES"] * 6 + ["ACTIVE", "ACTIVE",
                                                           {"state": "ACTIVE", "exit": _exits(spec)}]})
  rc, st, _ = _run(spec)
  assert rc == 0 and st.failures == 0


def test_a_host_without_heartbeat_past_the_startup_deadline_is_hung(cloud):
  spec = _spec(cloud, startup_timeout_s=30, max_failures=0)
  cloud.scenario(**{commands.resource_name(spec, 1): ["ACTIVE"]})
  # Process 0 beats (far in the future: always fresh); process 1 never does.
  workdir_lib.write_text(os.path.join(spec.workdir, "heartbeat", "process_0.json"), json.dumps(
      {"step": 3, "time": 4102444800, "phase": "training", "step_time": 1.0, "pid": 1}))
  rc, st, elapsed = _run(spec)
  assert rc == exit_codes.INTERNAL and "process 1 hung: no heartbeat" in st.message
  assert 30 < elapsed <= 40
  assert cloud.live() == []


def test_no_heartbeat_from_any_host_is_not_a_hang(cloud):
  # A trainer that cannot write heartbeats to the workdir must not be restarted forever.
  spec = _spec(cloud, startup_timeout_s=30)
  cloud.scenario(**{commands.resource_name(spec, 1): ["ACTIVE"] * 10 + [
      {"state": "ACTIVE", "exit": _exits(spec)}]})
  rc, st, elapsed = _run(spec)
  assert rc == 0 and st.failures == 0 and elapsed > 30


def test_resumed_babysitting_sees_exits_written_while_it_was_away(cloud):
  spec = _spec(cloud)
  name = commands.resource_name(spec, 1)
  runner = gcloud.Runner()
  runner.run(commands.qr_create(spec, 1, "/dev/null"))
  state_lib.save_state(spec.workdir, state_lib.RunState(phase="running", attempt=1, resource=name,
                                                       attempt_started=10.0))
  for i in range(spec.num_hosts):
    workdir_lib.write_text(os.path.join(spec.workdir, "launch", "exit", f"process_{i}.json"),
                         json.dumps({"rc": 0, "time": 20.0}))
  rc, st, _ = _run(spec)
  assert rc == 0 and st.phase == "done" and st.attempt == 1
  assert [v for v, _ in cloud.verbs()] == ["create", "describe", "delete"]
