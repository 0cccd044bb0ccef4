"""Profile on demand: the digest's classification on synthetic traces, a real capture in-process,
the command's refusals, and (slow) a capture of a running local job that xprof opens."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from launch import jobs
from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import heartbeat
from recurrentgemma_tpu import profiling
from test_workdir import ram_scheme  # pylint: disable=unused-import

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = 1_796_000_000_000_000_000  # unix ns of the synthetic sessions' start


# ------------------------------------------------------------------------------------ synthetic traces


def _hlo_module_bytes() -> bytes:
  """An HloProto of module `jit_train_step`: a dot fusion, an all-reduce, the scan's while loop (by
  name scope), an elementwise fusion, and a while loop that is not the scan."""
  from tensorflow.compiler.xla.service import hlo_pb2  # pylint: disable=g-import-not-at-top
  proto = hlo_pb2.HloProto()
  module = proto.hlo_module
  module.name = "jit_train_step"
  fused_dot = module.computations.add(name="fused_dot", id=1)
  fused_dot.instructions.add(name="p0", opcode="parameter", id=10)
  fused_dot.instructions.add(name="dot.1", opcode="dot", id=11)
  fused_add = module.computations.add(name="fused_add", id=2)
  fused_add.instructions.add(name="p1", opcode="parameter", id=20)
  fused_add.instructions.add(name="add.1", opcode="add", id=21)
  entry = module.computations.add(name="main", id=3)
  entry.instructions.add(name="fusion.7", opcode="fusion", id=30, called_computation_ids=[1])
  entry.instructions.add(name="all-reduce.2", opcode="all-reduce", id=31)
  scan = entry.instructions.add(name="while.3", opcode="while", id=32)
  scan.metadata.op_name = "jit(train_step)/Griffin/rg_lru/linear_scan/while"
  entry.instructions.add(name="fusion.9", opcode="fusion", id=33, called_computation_ids=[2])
  layers = entry.instructions.add(name="while.5", opcode="while", id=34)
  layers.metadata.op_name = "jit(train_step)/Griffin/while"
  return proto.SerializeToString()


class _Plane:
  """Builds one XPlane: interned event and stat names, events on named lines."""

  def __init__(self, space, name):
    self.plane = space.planes.add(name=name, id=len(space.planes))
    self._events, self._stats = {}, {}

  @staticmethod
  def _metadata_id(ids, metadata, name):
    """The id of `name` in a plane's metadata map (`ids` remembers them), added on first use."""
    if name not in ids:
      ids[name] = len(ids) + 1
      metadata[ids[name]].id = ids[name]
      metadata[ids[name]].name = name
    return ids[name]

  def stat_id(self, name):
    return self._metadata_id(self._stats, self.plane.stat_metadata, name)

  def event_id(self, name):
    return self._metadata_id(self._events, self.plane.event_metadata, name)

  def line(self, name, timestamp_ns=0):
    return self.plane.lines.add(name=name, id=len(self.plane.lines), timestamp_ns=timestamp_ns)

  def event(self, line, name, start_us, end_us, **stats):
    e = line.events.add(metadata_id=self.event_id(name), offset_ps=int(start_us * 1e6),
                        duration_ps=int((end_us - start_us) * 1e6))
    for key, value in stats.items():
      s = e.stats.add(metadata_id=self.stat_id(key))
      if isinstance(value, int):
        s.int64_value = value
      else:
        s.str_value = value
    return e


def _space(with_module=True):
  """A 1000 us CPU session (times in us): two runtime threads and the trainer's thread.

  thread A: fusion.7 (a dot) 100-300, all-reduce.2 300-400, while.3 (the scan) 400-500, while.5
  (the layer loop) 500-900 with fusion.9 (an add) 550-650 inside it. Thread B: fusion.9 200-350,
  fusion.7 850-950. Trainer thread: data_wait 0-50 and 940-1000.
  """
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  space = xplane_pb2.XSpace()
  meta = _Plane(space, "/host:metadata")
  if with_module:
    m = meta.plane.event_metadata[1]
    m.id, m.name = 1, "jit_train_step"
    s = m.stats.add(metadata_id=meta.stat_id("Hlo Proto"))
    s.bytes_value = _hlo_module_bytes()
  host = _Plane(space, "/host:CPU")
  a, b, py = host.line("tf_XLAPjRtCpuClient/1"), host.line("tf_XLAEigen/2"), host.line("python")
  op = dict(hlo_module="jit_train_step", device_ordinal=0)
  host.event(a, "fusion.7", 100, 300, hlo_op="fusion.7", **op)
  host.event(a, "all-reduce.2", 300, 400, hlo_op="all-reduce.2", **op)
  host.event(a, "while.3", 400, 500, hlo_op="while.3", **op)
  host.event(a, "while.5", 500, 900, hlo_op="while.5", **op)
  host.event(a, "fusion.9", 550, 650, hlo_op="fusion.9", **op)
  host.event(a, "ThunkExecutor::Execute", 0, 1000)  # no hlo_op: not a device op
  host.event(b, "fusion.9", 200, 350, hlo_op="fusion.9", **op)
  host.event(b, "fusion.7", 850, 950, hlo_op="fusion.7", **op)
  host.event(py, "data_wait", 0, 50)
  host.event(py, "data_wait", 940, 1000)
  env = _Plane(space, "Task Environment")
  for key, value in (("profile_start_time", START), ("profile_stop_time", START + 1_000_000)):
    s = env.plane.stats.add(metadata_id=env.stat_id(key))
    s.uint64_value = value
  return space


def test_digest_of_a_synthetic_cpu_trace_splits_the_window_by_hand_computed_times():
  digest = profiling.digest_xspace(_space())
  # Exclusive times (us), each instant to the first class of scan > collective > matmul > other
  # > data_wait > idle:
  #   0-50 data_wait; 50-100 idle; 100-300 matmul (B's add 200-300 under it); 300-350 collective
  #   (over B's add); 350-400 collective; 400-500 scan; 500-850 other (the layer loop and its add);
  #   850-950 matmul (B's dot over the loop and over data_wait 940-950); 950-1000 data_wait.
  expected = {"matmul": 300, "collective": 100, "scan": 100, "other": 350, "data_wait": 100,
              "idle": 50}
  assert digest["shares"] == pytest.approx({k: v / 1000 for k, v in expected.items()}, abs=1e-9)
  assert sum(digest["shares"].values()) == pytest.approx(1.0)
  assert digest["window_s"] == pytest.approx(1e-3)
  assert digest["devices"] == 1 and digest["hlo_modules"] == 1
  assert digest["top_ops"]["scan"] == ["while.3"]


def test_without_the_hlo_module_ops_are_classified_by_name():
  digest = profiling.digest_xspace(_space(with_module=False))
  # By name alone fusion.7 is no matmul and while.3 no scan; all-reduce.2 is still a collective:
  # 0-50 data_wait, 50-100 idle, 100-300 other, 300-400 collective, 400-950 other, 950-1000 data_wait.
  expected = {"matmul": 0, "collective": 100, "scan": 0, "other": 750, "data_wait": 100, "idle": 50}
  assert digest["shares"] == pytest.approx({k: v / 1000 for k, v in expected.items()}, abs=1e-9)


@pytest.mark.parametrize("name,category", [
    ("linear_scan_fwd", "scan"), ("linear_scan_bwd.3", "scan"), ("all-gather-start.2", "collective"),
    ("reduce-scatter.1", "collective"), ("collective-permute-done", "collective"),
    ("convolution.12", "matmul"), ("dot.4", "matmul"), ("fusion.33", "other"), ("copy.1", "other")])
def test_names_alone(name, category):
  assert profiling.classify(name, None) == category


def test_hlo_classification_looks_into_fusions_and_name_scopes():
  op = profiling.HloOp
  assert profiling.classify("fusion.1", op("fusion", frozenset({"dot", "add"}))) == "matmul"
  assert profiling.classify("fusion.2", op("fusion", frozenset({"all-gather"}))) == "collective"
  assert profiling.classify("while.1", op("while", op_name="a/linear_scan/while")) == "scan"
  assert profiling.classify("custom-call.1", op("custom-call", target="tpu_custom_call",
                                                op_name="x/linear_scan/pallas_call")) == "scan"
  assert profiling.classify("fusion.3", op("fusion", frozenset({"add", "multiply"}))) == "other"
  # A fusion named like a collective but computing a dot is a matmul: the module wins over names.
  assert profiling.classify("all-gather-fusion", op("fusion", frozenset({"dot"}))) == "matmul"


def test_device_planes_count_only_their_xla_ops_line_and_each_device_is_averaged():
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  space = xplane_pb2.XSpace()
  meta = _Plane(space, "/host:metadata")
  m = meta.plane.event_metadata[1]
  m.id, m.name = 1, "jit_train_step"
  m.stats.add(metadata_id=meta.stat_id("Hlo Proto")).bytes_value = _hlo_module_bytes()
  for d, busy_us in ((0, 600), (1, 200)):
    dev = _Plane(space, f"/device:TPU:{d}")
    ops = dev.line("XLA Ops", timestamp_ns=START)
    dev.event(ops, "convolution.3", 0, busy_us)  # not in the module: a matmul by its name
    dev.event(ops, "while.3", busy_us, busy_us + 50)  # the module's scan, found without hlo_module
    modules = dev.line("XLA Modules", timestamp_ns=START)  # spans the ops: must not count
    dev.event(modules, "jit_train_step(1)", 0, 1000)
  host = _Plane(space, "/host:CPU")
  host.event(host.line("python", timestamp_ns=START), "data_wait", 900, 1000)
  digest = profiling.digest_xspace(space, START, START + 1_000_000)
  assert digest["devices"] == 2
  assert digest["shares"]["matmul"] == pytest.approx((0.6 + 0.2) / 2)
  assert digest["shares"]["scan"] == pytest.approx(0.05)
  assert digest["shares"]["data_wait"] == pytest.approx(0.1)
  assert digest["shares"]["other"] == 0
  assert digest["shares"]["idle"] == pytest.approx(1 - 0.4 - 0.05 - 0.1)


def test_exclusive_times_against_a_sampled_timeline():
  rng = np.random.default_rng(0)
  categories = profiling.CATEGORIES[:5]
  intervals = {c: [tuple(sorted(rng.uniform(-10, 110, 2))) for _ in range(rng.integers(0, 6))]
               for c in categories}
  got = profiling.exclusive_times(intervals, 0.0, 100.0)
  grid = np.arange(0, 100, 0.001) + 0.0005
  owner = np.full(grid.shape, len(categories))
  for rank in reversed(range(len(categories))):
    for a, b in intervals[categories[rank]]:
      owner[(grid >= a) & (grid < b)] = rank
  for rank, c in enumerate(profiling.CATEGORIES):
    assert got[c] == pytest.approx(np.sum(owner == rank) * 0.001, abs=0.01), c
  assert sum(got.values()) == pytest.approx(100.0)


# ------------------------------------------------------------------------------------ a real capture


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
  """OnDemand around a jitted matmul loop with a 20 ms annotated data wait per step, as the trainer
  calls it: (workdir, the digest, the steps dispatched, the seconds each step's wait took)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("capture"))
  step_fn = jax.jit(lambda x: jnp.tanh(x @ x) @ x)
  x = jnp.ones((384, 384), jnp.float32) / 384
  step_fn(x).block_until_ready()
  profiling.write_request(workdir, profiling.Request(id="r1", steps=3, process=None,
                                                     prediction="none: a test"))
  on_demand = profiling.OnDemand(workdir, 0, poll_s=0.0)
  step, waits = 0, []
  while not os.path.exists(profiling.digest_path(workdir, "r1", 0)) and step < 20:
    t = time.perf_counter()
    with jax.profiler.TraceAnnotation(profiling.DATA_WAIT):
      time.sleep(0.02)
    waits.append(time.perf_counter() - t)  # on a busy host a 20 ms sleep lasts longer
    pending = [step_fn(x)]
    step += 1
    on_demand.step_boundary(step, pending)
  return workdir, json.load(open(profiling.digest_path(workdir, "r1", 0))), step, waits


def test_a_real_capture_digests_a_matmul_loop_and_its_data_waits(capture):
  """The trace lands in the workdir, the digest sees mostly matmul and data wait, the shares sum to
  1 and the step count is exact."""
  workdir, digest, step, waits = capture
  assert "error" not in digest, digest
  assert (digest["start_step"], digest["end_step"], digest["steps"], step) == (1, 4, 3, 4)
  assert json.load(open(profiling.started_path(workdir, "r1", 0)))["start_step"] == 1
  shares = digest["shares"]
  assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
  assert shares["matmul"] > 0.05 and shares["matmul"] > shares["other"]
  # Steps 2..4 waited inside the window (step 1's wait came before the capture started).
  assert shares["data_wait"] == pytest.approx(sum(waits[1:4]) / digest["seconds"], rel=0.25)
  assert digest["step_time_s"] == pytest.approx(digest["seconds"] / 3)
  assert digest["trace"] == profiling.session_dir(workdir, "r1") + "/process_0.xplane.pb"
  assert os.path.exists(digest["trace"])
  assert digest["prediction"] == "none: a test" and digest["predicted_step_s"] is None
  # The same request is not captured twice, even by a new trainer process (a restart).
  again = profiling.OnDemand(workdir, 0, poll_s=0.0)
  again.step_boundary(step + 1, [])
  assert again._capture is None  # pylint: disable=protected-access


def test_xprof_opens_the_capture(capture):
  """TensorBoard's profile plugin (xprof) converts the captured XSpace with its own code: the tool
  list, the overview page, and a trace viewer that holds the digest's heaviest op and data waits."""
  pytest.importorskip("xprof")
  from xprof.convert import raw_to_tool_data  # pylint: disable=g-import-not-at-top
  _, digest, _, _ = capture
  paths = [digest["trace"]]
  assert {"trace_viewer@", "overview_page"} <= set(raw_to_tool_data.xspace_to_tool_names(paths))
  overview, _ = raw_to_tool_data.xspace_to_tool_data(paths, "overview_page", {})
  assert json.loads(overview)  # a parsed page, not an error string
  trace, _ = raw_to_tool_data.xspace_to_tool_data(paths, "trace_viewer", {})
  names = {e.get("name") for e in json.loads(trace)["traceEvents"]}
  assert profiling.DATA_WAIT in names
  assert digest["top_ops"]["matmul"][0] in names


def test_a_failed_capture_is_recorded_and_training_goes_on(tmp_path):
  """A capture that cannot start (here: another trace is running) writes its error as the digest,
  so launch.profile stops waiting, and raises nothing into the training loop."""
  import jax  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  profiling.write_request(workdir, profiling.Request(id="r3", steps=2, process=0))
  jax.profiler.start_trace(str(tmp_path / "other"))
  try:
    on_demand = profiling.OnDemand(workdir, 0, poll_s=0.0)
    on_demand.step_boundary(3, [])
  finally:
    jax.profiler.stop_trace()
  digest = json.load(open(profiling.digest_path(workdir, "r3", 0)))
  assert digest["error"].startswith("RuntimeError: Profile has already been started")
  assert on_demand._capture is None  # pylint: disable=protected-access


def test_a_capture_in_a_remote_workdir_goes_through_the_file_layer(ram_scheme):  # pylint: disable=unused-argument,redefined-outer-name
  """A URL workdir (TensorFlow's ram://, served by the same epath backend as gs://): the request is
  read, the trace written locally and copied up, the digest written beside it."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir = "ram://profiling-bucket/run"
  profiling.write_request(workdir, profiling.Request(id="r4", steps=2, process=0))
  step_fn = jax.jit(lambda x: x @ x)
  x = jnp.ones((64, 64), jnp.float32)
  on_demand = profiling.OnDemand(workdir, 0, poll_s=0.0)
  for step in range(1, 5):
    on_demand.step_boundary(step, [step_fn(x)])
  digest = json.loads(workdir_lib.read_text(profiling.digest_path(workdir, "r4", 0)))
  assert "error" not in digest, digest
  assert (digest["start_step"], digest["steps"]) == (1, 2)
  assert digest["trace"] == profiling.session_dir(workdir, "r4") + "/process_0.xplane.pb"
  assert workdir_lib.exists(digest["trace"])
  assert workdir_lib.exists(profiling.started_path(workdir, "r4", 0))


def test_a_request_for_another_process_is_ignored(tmp_path):
  workdir = str(tmp_path)
  profiling.write_request(workdir, profiling.Request(id="r2", steps=2, process=1))
  on_demand = profiling.OnDemand(workdir, 0, poll_s=0.0)
  on_demand.step_boundary(5, [])
  assert on_demand._capture is None  # pylint: disable=protected-access
  assert not os.path.exists(profiling.started_path(workdir, "r2", 0))


# ------------------------------------------------------------------------------------ the command


def _beat(workdir, phase="training", age=0.0, step_time=0.1, process=0):
  path = heartbeat.path(workdir, process)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"step": 7, "time": time.time() - age, "phase": phase, "step_time": step_time,
               "pid": os.getpid()}, f)


@pytest.mark.parametrize("setup,flags,message", [
    (None, ["--steps=3"], "is not running: it has no heartbeat"),
    ({"phase": "done"}, ["--steps=3"], "is not running: its last heartbeat says done at step 7"),
    ({"age": 900.0}, ["--steps=3"], "is not running: its last heartbeat (step 7, training) is 900s old"),
    ({}, ["--steps=0"], "--steps=0: give a number of steps from 1 to 100"),
    ({}, ["--steps=101"], "--steps=101: give a number of steps from 1 to 100"),
    ({}, ["--steps=3", "--process=2"], "--process=2: give all or a process index of this run (0, 1)"),
    ({}, ["--steps=3", "--process=one"], "--process=one: give all or a process index"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, setup, flags, message):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  if setup is not None:
    _beat(workdir, **setup)
    _beat(workdir, process=1)
  with pytest.raises(exit_codes.UserError) as e:
    jobs.profile(workdir, int(flags[0].split("=")[1]),
                 flags[1].split("=")[1] if len(flags) > 1 else "0", log=lambda _: None)
  assert message in str(e.value)
  assert not os.path.exists(profiling.request_path(workdir))  # nothing asked of the job


def test_the_command_reports_a_workdir_that_is_not_running_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "launch.profile", f"--workdir={tmp_path}",
                         "--steps=3"], capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
  assert proc.returncode == exit_codes.USER_ERROR
  assert proc.stderr.strip().splitlines() == [
      f"error: {tmp_path} is not running: it has no heartbeat "
      f"({heartbeat.path(str(tmp_path), 0)})"]


def test_the_digest_prints_shares_that_sum_to_100_and_says_when_there_is_no_prediction():
  digest = {"process": 0, "start_step": 10, "end_step": 13, "steps": 3, "devices": 1,
            "shares": {"scan": 0.1, "collective": 0.0, "matmul": 0.5, "other": 0.2,
                       "data_wait": 0.05, "idle": 0.15},
            "top_ops": {"matmul": ["fusion.7"]}, "step_time_s": 0.2, "predicted_step_s": None,
            "prediction": "a local job: the planner predicts TPU step times only", "trace": "t"}
  text = profiling.format_digest(digest)
  assert "steps 11..13 (3 steps" in text  # metrics.jsonl's numbers: the count after each step
  assert "matmuls:               50.0%   (fusion.7)" in text
  assert "total:                100.0%" in text
  assert "no prediction (a local job: the planner predicts TPU step times only)" in text
  text = profiling.format_digest({**digest, "predicted_step_s": 0.1, "prediction": "planner"})
  assert "0.2 s measured, 0.1 s predicted by the planner (x2;" in text


def test_the_command_waits_for_a_capture_and_prints_it_against_the_cached_prediction(
    tmp_path, monkeypatch):
  """A TPU VM job's spec and a cached fit check (0.25 s/step predicted); a trainer stand-in (a
  thread stepping a jitted function, beating and polling as the trainer does) serves the request;
  jobs.profile returns 0 and prints the digest with the measured/predicted ratio."""
  import threading  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from launch import preflight  # pylint: disable=g-import-not-at-top
  from launch import spec as spec_lib  # pylint: disable=g-import-not-at-top
  from launch import state as state_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("RG_LAUNCH_CACHE", str(tmp_path / "cache"))
  workdir = str(tmp_path / "run")
  spec = spec_lib.JobSpec(config="configs/tiny.py", overrides=(), workdir=workdir, backend="tpu_vm",
                          target=spec_lib.parse_target("v5p-8"), zone="z", project="p",
                          allow_local_workdir=True, fingerprint="f00d")
  state_lib.save_spec(spec)
  assert jobs.step_time_prediction(workdir) == (
      None, f"no fit check for v5p-8 x 1 is cached on this machine ({tmp_path / 'cache'})")
  os.makedirs(tmp_path / "cache")
  key = preflight.fit_cache_key("f00d", spec.target, 1)
  (tmp_path / "cache" / f"{key}.json").write_text(json.dumps({"fits": True, "report": "",
                                                              "step_s": 0.25}))
  assert jobs.step_time_prediction(workdir) == (0.25, "the fit check's planner for v5p-8 x 1")

  step_fn = jax.jit(lambda x: x @ x)
  x = jnp.ones((128, 128), jnp.float32)
  step_fn(x).block_until_ready()
  beat = heartbeat.Heartbeat(workdir, 0)
  on_demand = profiling.OnDemand(workdir, 0, poll_s=0.0)
  stop = threading.Event()

  def trainer():
    step = 0
    while not stop.is_set():
      with jax.profiler.TraceAnnotation(profiling.DATA_WAIT):
        time.sleep(0.005)
      out = step_fn(x)
      step += 1
      beat.beat("training", step, 0.01)
      on_demand.step_boundary(step, [out])

  thread = threading.Thread(target=trainer, daemon=True)
  thread.start()
  lines = []
  try:
    while heartbeat.read_record(workdir, 0) is None:
      time.sleep(0.01)
    assert jobs.profile(workdir, 4, "all", log=lines.append, poll_s=0.05) == exit_codes.OK
  finally:
    stop.set()
    thread.join()
  text = "\n".join(lines)
  request = profiling.read_request(workdir)
  assert (request.steps, request.process, request.predicted_step_s) == (4, None, 0.25)
  digest = json.load(open(profiling.digest_path(workdir, request.id, 0)))
  assert digest["steps"] == 4 and digest["predicted_step_s"] == 0.25
  assert (f"{digest['step_time_s']:.4g} s measured, 0.25 s predicted by the planner "
          f"(x{digest['step_time_s'] / 0.25:.3g}; the fit check's planner for v5p-8 x 1)") in text
  assert f"python -m xprof.server --logdir={profiling.capture_dir(workdir, request.id)}" in text


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_profile_of_a_running_local_job_without_restarting_it(tmp_path):
  """launch.submit --backend=local with two processes; launch.profile --process=all captures 3 steps
  of each while the job trains on (same attempt, same pids), prints both digests, and xprof opens
  the traces; once the job is stopped, profiling it is refused in one line."""
  pytest.importorskip("xprof")
  from xprof.convert import raw_to_tool_data  # pylint: disable=g-import-not-at-top
  from launch import state as state_lib  # pylint: disable=g-import-not-at-top
  from test_train_common import SMALL, subprocess_env  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  overrides = {**SMALL, "train.steps": 100000, "checkpoint.save_every": 100000,
               "train.log_every": 50}
  env = subprocess_env(num_devices=1)
  launcher = subprocess.Popen(
      [sys.executable, "-m", "launch.submit", "--backend=local", "--num_processes=2",
       "--config=configs/tiny.py", f"--workdir={workdir}", "--skip_fit_check"]
      + [f"--config.{k}={v}" for k, v in overrides.items()],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 600
    while not all((heartbeat.read(workdir, i) or {}).get("phase") == "training" for i in (0, 1)):
      assert launcher.poll() is None, f"the launcher exited ({launcher.returncode})"
      assert time.time() < deadline, "the job did not start training"
      time.sleep(0.2)
    before = state_lib.load_state(workdir)
    command = subprocess.run(
        [sys.executable, "-m", "launch.profile", f"--workdir={workdir}", "--steps=3", "--process=all"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert command.returncode == 0, command.stdout[-3000:] + command.stderr[-3000:]
    after = state_lib.load_state(workdir)
    assert (after.attempt, after.pids) == (before.attempt, before.pids)  # not restarted
    request = profiling.read_request(workdir)
    digests = [json.load(open(profiling.digest_path(workdir, request.id, i))) for i in (0, 1)]
    for i, digest in enumerate(digests):
      assert "error" not in digest, digest
      assert digest["steps"] == 3 and digest["end_step"] - digest["start_step"] == 3
      assert sum(digest["shares"].values()) == pytest.approx(1.0, abs=1e-6)
      # The tiny Griffin's matmuls and its RG-LRU scan (the XLA scan on CPU, found by its name
      # scope in the trace's HLO module) both take time; gloo's all-reduces are collectives.
      for category in ("matmul", "scan", "collective"):
        assert digest["shares"][category] > 0, (category, digest["shares"])
      assert digest["hlo_modules"] >= 1
      assert f"process {i}: steps {digest['start_step'] + 1}..{digest['end_step']} (3 steps" in (
          command.stdout)
      assert digest["prediction"] == "a local job: the planner predicts TPU step times only"
    assert command.stdout.count("no prediction (a local job") == 2
    # Both processes' traces form one profiler session; xprof converts it.
    paths = [d["trace"] for d in digests]
    assert os.path.dirname(paths[0]) == os.path.dirname(paths[1])
    assert "trace_viewer@" in raw_to_tool_data.xspace_to_tool_names(paths)
    trace, _ = raw_to_tool_data.xspace_to_tool_data(paths[:1], "trace_viewer", {})
    names = {e.get("name") for e in json.loads(trace)["traceEvents"]}
    assert profiling.DATA_WAIT in names and digests[0]["top_ops"]["scan"][0] in names
    beat = heartbeat.read_record(workdir, 0)
    assert beat.phase == "training" and beat.step > digests[0]["end_step"]  # trains on
  finally:
    launcher.send_signal(signal.SIGTERM)  # the trainers save and exit 42, then the launcher
    launcher.wait(timeout=300)
  refused = subprocess.run([sys.executable, "-m", "launch.profile", f"--workdir={workdir}",
                            "--steps=3"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
  assert refused.returncode == exit_codes.USER_ERROR
  assert refused.stderr.strip().splitlines() == [
      f"error: {workdir} is not running: the launcher's state is stopped (launcher terminated)"]
