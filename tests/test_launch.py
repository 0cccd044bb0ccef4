"""launch/: targets, job spec validation, each host's environment, the hang rule, and every gcloud
command parsed by the real gcloud CLI (no credentials: well-formed -> exit 1 auth error, malformed ->
exit 2 usage error)."""

import concurrent.futures
import os
import re
import shutil
import signal
import subprocess

import pytest

from launch import commands
from launch import jobs
from launch import spec as spec_lib
from launch import state as state_lib
from launch import supervisor
from sharding import chips as chips_lib
from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import heartbeat

GCLOUD = shutil.which("gcloud")


@pytest.mark.parametrize("text, accel, topology, chips, hosts", [
    # v5p-N counts TensorCores (2 per chip); Cloud TPU's default topology for 128 chips is 4x4x8.
    ("v5p-256", "v5p-256", "v5p:4x4x8", 128, 32),
    ("v5p-8", "v5p-8", "v5p:2x2x1", 4, 1),
    ("v5p:4x4x8", "v5p-256", "v5p:4x4x8", 128, 32),
    ("v5p:2x2x1", "v5p-8", "v5p:2x2x1", 4, 1),
    ("v5litepod-16", "v5litepod-16", "v5e:4x4", 16, 4),
    ("v5litepod:4x4", "v5litepod-16", "v5e:4x4", 16, 4),
    ("v5litepod-8", "v5litepod-8", "v5e:2x4", 8, 1),
    ("v6e-256", "v6e-256", "v6e:16x16", 256, 64),
    ("v4-32", "v4-32", "v4:2x2x4", 16, 4),
])
def test_one_target_grammar_for_launch_and_compile(text, accel, topology, chips, hosts):
  # `launch.submit --target` and `compile --topology` parse the same strings the same way.
  t = spec_lib.parse_target(text)
  assert (t.accelerator_type, t.topology_name, t.chips, t.hosts) == (accel, topology, chips, hosts)
  chip, shape = chips_lib.parse_topology(text)
  assert f"{chip.name}:{'x'.join(map(str, shape))}" == topology


@pytest.mark.parametrize("bad, message", [
    ("v5p-100", "not a v5p slice size"),
    ("v5litepod-3", "not a v5litepod slice size"),
    ("v7x-8", "'v7x' is not one of"),
    ("v7x:2x2", "'v7x' is not one of"),
    ("tpu", "is not GEN:TOPOLOGY"),
    ("v5p:4x4x", "is not GEN:TOPOLOGY"),
    ("v5p:0x4x4", "zero dimension"),
])
def test_bad_targets_name_the_value_and_the_valid_forms(bad, message):
  for parse in (spec_lib.parse_target, chips_lib.parse_topology):
    with pytest.raises(ValueError, match=re.escape(f"target={bad!r}") + ".*" + message):
      parse(bad)


def _spec(**kw):
  base = dict(config="configs/tiny.py", overrides=("train.steps=5",), workdir="gs://b/runs/x",
              backend="tpu_vm", target=spec_lib.parse_target("v5p-16"), zone="us-east5-a",
              project="p")
  base.update(kw)
  return spec_lib.JobSpec(**base)


@pytest.mark.parametrize("kw, match", [
    (dict(workdir="/tmp/x"), "gs://"),
    (dict(config="my/own.py"), "under configs/"),
    (dict(zone=""), "--zone"),
    (dict(capacity="cheap"), "capacity"),
    (dict(target=None), "--target"),
    (dict(backend="gke"), "--cluster"),
    (dict(backend="local", num_slices=2), "one slice"),
    (dict(overrides=("train.steps",)), "group.field=value"),
])
def test_invalid_specs_are_refused_by_name(kw, match):
  with pytest.raises(ValueError, match=match):
    _spec(**kw)


def test_spec_round_trips_through_json():
  spec = _spec(num_slices=2, capacity="reserved")
  assert spec_lib.JobSpec.from_json(spec.to_json()) == spec
  assert len(spec.run_id) <= 40 and spec.run_id == _spec().run_id  # stable for the workdir


def test_every_host_runs_exactly_the_trainer():
  argv = commands.train_argv(_spec())
  assert argv == ["python3", "-m", "recurrentgemma_tpu.train", "--config=configs/tiny.py",
                  "--workdir=gs://b/runs/x", "--config.train.steps=5"]


def test_multislice_environment_numbers_processes_by_slice_then_worker():
  spec = _spec(target=spec_lib.parse_target("v5p-32"), num_slices=3)  # 4 hosts per slice
  envs = [commands.host_env(spec, i, "h0") for i in range(spec.num_hosts)]
  assert [e["JAX_PROCESS_ID"] for e in envs] == [str(i) for i in range(12)]
  assert {e["JAX_NUM_PROCESSES"] for e in envs} == {"12"}
  assert [e["MEGASCALE_SLICE_ID"] for e in envs] == [str(i // 4) for i in range(12)]
  assert {e["MEGASCALE_NUM_SLICES"] for e in envs} == {"3"}
  assert {e["JAX_COORDINATOR_ADDRESS"] for e in envs} == {"h0:8476"}
  assert "MEGASCALE_NUM_SLICES" not in commands.host_env(_spec(), 0, "h0")
  with pytest.raises(ValueError):
    commands.host_env(spec, 12, "h0")


def test_distributed_reads_the_launcher_environment():
  from recurrentgemma_tpu import distributed
  env = commands.host_env(_spec(), 1, "h0")
  kw = distributed.initialize_kwargs(env=env)
  assert kw["coordinator_address"] == "h0:8476" and kw["num_processes"] == 2
  assert kw["process_id"] == 1 and kw["heartbeat_timeout_seconds"] == commands.HEARTBEAT_TIMEOUT_S
  assert kw["initialization_timeout"] == commands.INITIALIZATION_TIMEOUT_S
  assert distributed.initialize_kwargs(env={}) is None
  assert distributed.initialize_kwargs(process_id=0, env=env)["process_id"] == 0  # flags override
  with pytest.raises(ValueError, match="outside"):
    distributed.initialize_kwargs(env={**env, "JAX_PROCESS_ID": "2"})


def test_supervisor_classifies_every_kind_of_end_and_charges_two_budgets():
  kind = lambda codes: (lambda o: o and (o.kind, o.code))(supervisor.classify(codes))
  assert kind([None, None]) is None and kind([0, None]) is None  # nothing decided yet
  assert kind([0, 0]) == ("done", exit_codes.OK)
  assert kind([exit_codes.PREEMPTED, None]) == ("preempted", exit_codes.PREEMPTED)
  # A real failure outweighs a preemption, and a fatal exit outweighs both (whatever the order).
  assert kind([exit_codes.PREEMPTED, exit_codes.INTERNAL]) == ("failed", exit_codes.INTERNAL)
  assert kind([-9, exit_codes.NON_FINITE]) == ("fatal", exit_codes.NON_FINITE)
  for fatal in (exit_codes.USER_ERROR, exit_codes.NON_FINITE, exit_codes.NO_FIT):
    assert kind([None, fatal]) == ("fatal", fatal)
  assert "killed by signal 9" in supervisor.classify([-9]).detail
  ledger = state_lib.RunState()
  budgets = spec_lib.Budgets(max_preemptions=1, max_failures=0)
  preempted, failed = supervisor.classify([exit_codes.PREEMPTED]), supervisor.classify([1])
  assert supervisor.charge(ledger, preempted, budgets) is None  # within the preemption budget
  assert "preempted 2 times" in supervisor.charge(ledger, preempted, budgets)
  assert "failed 1 times" in supervisor.charge(ledger, failed, budgets)  # a separate budget
  assert (ledger.preemptions, ledger.failures) == (2, 1)
  fatal = supervisor.classify([exit_codes.USER_ERROR])
  assert "retrying cannot help" in supervisor.charge(state_lib.RunState(), fatal,
                                                     spec_lib.Budgets(max_failures=100))


def test_hang_rule():
  hb = lambda t, phase="training", step_time=1.0, pid=7: heartbeat.Record(5, t, phase, step_time, pid)
  budgets = spec_lib.Budgets(startup_timeout_s=60, hang_factor=10, min_hang_s=30)
  v = lambda h, now, **o: supervisor.hang_verdict(h, now=now, started=100.0, budgets=budgets, **o)
  assert v(None, 150) is None  # starting, within the start-up deadline
  assert "no heartbeat" in v(None, 161)
  assert v(hb(50), 150) is None  # an earlier attempt's heartbeat counts as none
  assert "still compiling" in v(hb(110, "compiling"), 161)
  assert v(hb(200), 229) is None and "no heartbeat for 31s" in v(hb(200), 231)  # min_hang
  assert v(hb(200, step_time=5.0), 249) is None and v(hb(200, step_time=5.0), 251)  # 10 x step
  assert v(hb(200, "done"), 9999) is None
  assert v(hb(200, "saving"), 259) is None and "phase saving" in v(hb(200, "saving"), 261)
  # Another process's file (pid differs) counts as none: the start-up deadline decides.
  assert v(hb(120), 150, pid=8) is None and "no heartbeat" in v(hb(120), 161, pid=8)
  assert v(hb(140), 161, pid=7) is None


def test_first_traceback_is_cut_at_its_exception_line():
  log = "ok\nTraceback (most recent call last):\n  File x\n    y()\nValueError: bad\nmore\n" \
        "Traceback (most recent call last):\n  File z\nKeyError: 2\n"
  assert jobs.first_traceback(log) == ("Traceback (most recent call last):\n  File x\n    y()\n"
                                       "ValueError: bad")
  assert jobs.first_traceback("no error") is None


@pytest.mark.parametrize("num_slices", [1, 2])
def test_startup_script_is_valid_bash(num_slices, tmp_path):
  script = tmp_path / "startup.sh"
  script.write_text(commands.startup_script(_spec(num_slices=num_slices), "gs://b/w.whl"))
  proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------ real gcloud


def _all_gcloud_commands(tmp_path):
  script = tmp_path / "startup.sh"
  script.write_text("#!/bin/bash\n")
  cmds = []
  for num_slices in (1, 2):
    for capacity in spec_lib.CAPACITIES:
      spec = _spec(num_slices=num_slices, capacity=capacity)
      cmds.append(commands.qr_create(spec, 1, str(script)))
    name = commands.resource_name(spec, 1)
    cmds += [commands.qr_describe(spec, name), commands.qr_delete(spec, name)]
    cmds += [commands.tpu_ssh(spec, n, commands.restart_in_place_command(spec.run_id))
             for n in commands.node_names(spec, 1)[:1]]
  cmds.append(commands.qr_list("us-east5-a", "p"))
  cmds.append(commands.qr_list("us-east5-a", "p", _spec().run_id))
  cmds.append(commands.gke_credentials(_spec(backend="gke", cluster="c", image="python:3.11")))
  return cmds


def _gcloud(argv, config_dir):
  assert argv[0] == "gcloud"
  env = {**os.environ, "CLOUDSDK_CONFIG": str(config_dir), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}
  return subprocess.run([GCLOUD] + argv[1:], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow  # ~20 gcloud start-ups: ~25 s on 2 idle cores
@pytest.mark.skipif(GCLOUD is None, reason="gcloud CLI not installed")
def test_real_gcloud_accepts_every_generated_command(tmp_path):
  config_dir = tmp_path / "gcloud-config"  # empty: no account, so nothing reaches the network
  config_dir.mkdir()
  cmds = _all_gcloud_commands(tmp_path)
  # Control: the oracle tells a usage error (2) from an auth error (1).
  bad = list(cmds[0])
  bad[bad.index("--quiet")] = "--nodes-prefix=x"
  cmds_and_bad = cmds + [bad]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(lambda a: _gcloud(a, config_dir), cmds_and_bad))
  *good, control = results
  assert control.returncode == 2 and "unrecognized arguments" in control.stderr
  for argv, res in zip(cmds, good):
    assert res.returncode == 1 and "active account" in res.stderr, (commands.quote(argv), res.stderr)


# ------------------------------------------------------------------------------------ preflight


def test_fit_check_runs_the_compile_cli_once_per_fingerprint_target_and_slices(tmp_path, monkeypatch):
  from launch import preflight
  monkeypatch.setenv("RG_LAUNCH_CACHE", str(tmp_path / "cache"))
  calls = []

  def fake_compile(argv, env, timeout_s, log):
    calls.append(argv)
    return exit_codes.NO_FIT, "total 120.00 GiB per chip: does not fit"

  monkeypatch.setattr(preflight, "run_compile", fake_compile)
  quiet = lambda s: None
  first = preflight.fit_check(_spec(), "f" * 64, log=quiet)
  assert not first.fits and not first.cached and "does not fit" in first.report
  assert calls[0][1:4] == ["-m", "recurrentgemma_tpu.compile", "--config=configs/tiny.py"]
  assert calls[0][4:6] == ["--topology=v5p:2x2x2", "--num_slices=1"]
  assert calls[0][6].startswith("--report_json=") and calls[0][8:] == ["--config.train.steps=5"]
  assert calls[0][7].startswith(f"--save_executable={tmp_path / 'cache'}") and calls[0][7].endswith(
      ".executable")  # kept beside the verdict, shipped with the job
  assert preflight.fit_check(_spec(), "f" * 64, log=quiet).cached and len(calls) == 1
  preflight.fit_check(_spec(num_slices=2), "f" * 64, log=quiet)
  preflight.fit_check(_spec(), "e" * 64, log=quiet)
  assert len(calls) == 3
  for code in (exit_codes.USER_ERROR, exit_codes.INTERNAL):  # a bad request, a crash: no verdict
    monkeypatch.setattr(preflight, "run_compile", lambda argv, env, t, log, code=code: (code, "x"))
    with pytest.raises(ValueError, match="could not run"):
      preflight.fit_check(_spec(target=spec_lib.parse_target("v5p-32")), "f" * 64, log=quiet)


def test_a_compiler_out_of_memory_is_a_cached_does_not_fit(tmp_path, monkeypatch):
  from launch import preflight
  monkeypatch.setenv("RG_LAUNCH_CACHE", str(tmp_path / "cache"))
  calls = []
  oom = ("jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total "
         "memory required for HLO temporaries (19.13G) exceeds available HBM (15.75G).")
  monkeypatch.setattr(preflight, "run_compile",
                      lambda argv, env, t, log: (calls.append(argv), (exit_codes.INTERNAL, oom))[1])
  first = preflight.fit_check(_spec(), "f" * 64, log=lambda s: None)
  assert not first.fits and not first.cached and "RESOURCE_EXHAUSTED" in first.report
  again = preflight.fit_check(_spec(), "f" * 64, log=lambda s: None)
  assert not again.fits and again.cached and len(calls) == 1


def test_the_fit_check_streams_each_line_as_the_compile_prints_it(tmp_path):
  """Each line reaches the log while the child still runs (it waits for a file the log writes)."""
  from launch import preflight
  import sys
  flag = tmp_path / "seen"
  child = ("import os, sys, time\n"
           "print('first line')\n"  # no flush: PYTHONUNBUFFERED must make it leave at once
           f"deadline = time.time() + 60\n"
           f"while not os.path.exists({str(flag)!r}) and time.time() < deadline:\n"
           "  time.sleep(0.05)\n"
           f"print('second line' if os.path.exists({str(flag)!r}) else 'buffered')\n")
  seen = []

  def log(line):
    seen.append(line)
    if "first line" in line:
      flag.write_text("")  # only possible if the first line arrived before the child exited

  rc, out = preflight.run_compile([sys.executable, "-c", child], dict(os.environ), 120, log)
  assert rc == 0 and seen == ["  | first line", "  | second line"], seen
  assert out == "first line\nsecond line"


def test_a_plan_that_does_not_fit_stops_before_anything_is_created(tmp_path, monkeypatch):
  from launch import preflight
  monkeypatch.setattr(preflight, "fingerprint", lambda spec: "f" * 64)
  monkeypatch.setattr(preflight, "fit_check",
                      lambda spec, fp, log: preflight.FitCheck(False, "120 GiB per chip", cached=True))
  out = []
  spec = _spec(workdir=str(tmp_path / "run"), allow_local_workdir=True)
  assert jobs.submit(spec, log=out.append) == 4
  assert "120 GiB per chip" in out[0]
  assert not (tmp_path / "run").exists()  # nothing written, nothing submitted


@pytest.mark.parametrize("backend", ["tpu_vm", "gke"])
def test_dry_run_prints_every_command_and_changes_nothing(tmp_path, monkeypatch, backend):
  from launch import preflight
  monkeypatch.setattr(preflight, "fingerprint", lambda spec: "f" * 64)
  monkeypatch.setenv("PATH", str(tmp_path))  # nothing can run: no gcloud, kubectl or pip here
  out = []
  spec = _spec(workdir=str(tmp_path / "run"), allow_local_workdir=True, backend=backend,
               cluster="c", image="python:3.11", num_slices=2)
  assert jobs.submit(spec, dry_run=True, skip_fit_check=True, log=out.append) == 0
  text = "\n".join(out)
  assert not (tmp_path / "run").exists()
  assert "pip wheel --no-deps" in text
  for i in range(spec.num_hosts):
    assert f"JAX_PROCESS_ID={i}\n" in text
  if backend == "tpu_vm":
    labelled = spec_lib.JobSpec(**{**spec.__dict__, "fingerprint": "f" * 64})
    assert commands.quote(commands.qr_create(labelled, 1, "startup.sh")) in out
    assert "#!/bin/bash" in text and commands.quote(commands.qr_delete(spec, spec.run_id + "-1")) in out
  else:
    assert "kubectl apply -f jobset.yaml" in out and "kind: JobSet" in text


def test_host_hygiene_kills_only_this_runs_stale_processes_and_removes_the_lockfile(tmp_path,
                                                                                   monkeypatch):
  from launch.backends import local
  lock = tmp_path / "libtpu_lockfile"
  lock.write_text("")
  monkeypatch.setattr(local, "LIBTPU_LOCKFILE", str(lock))
  stale = subprocess.Popen(["sleep", "60"], start_new_session=True)
  # A leftover that does not end on SIGTERM (wedged): SIGKILLed once the grace period is over.
  wedged = subprocess.Popen(["python3", "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                             "signal.SIG_IGN); print(flush=True); time.sleep(60)"],
                            start_new_session=True, stdout=subprocess.PIPE)
  wedged.stdout.readline()  # its handler is in place
  bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
  try:
    st = state_lib.RunState(pids=[stale.pid, wedged.pid, bystander.pid])
    # The bystander's recorded start time differs: a reused pid, not ours.
    st.event("started", starts={str(stale.pid): local._start_time(stale.pid),
                                str(wedged.pid): local._start_time(wedged.pid),
                                str(bystander.pid): "0"})
    st.event("failed", detail="launcher died")
    assert local.live_pids(st) == [stale.pid, wedged.pid]
    local.host_hygiene(st, log=lambda s: None, grace_s=1.0)
    # SIGTERM first (a leftover trainer saves on it), SIGKILL only after the grace period.
    assert stale.wait(timeout=10) == -signal.SIGTERM
    assert wedged.wait(timeout=10) == -signal.SIGKILL
    assert bystander.poll() is None and not lock.exists()
  finally:
    for p in (stale, wedged, bystander):
      p.kill()
      p.wait()
