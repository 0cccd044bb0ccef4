"""Profile on demand: a control file the trainer polls, an N-step JAX profiler capture, its digest.

`python -m launch.profile --workdir=W --steps=N` writes a request; every training process polls it
at step boundaries (at most every `POLL_S`, through `workdir.py`, so local disks and gs:// alike),
and a process it names captures the next N steps with `jax.profiler` without restarting:

  <workdir>/profile/request.json                      {"id", "steps", "process", "predicted_step_s", ...}
  <workdir>/profile/<id>/plugins/profile/<id>/process_<i>.xplane.pb     the trace TensorBoard opens
  <workdir>/profile/<id>/plugins/profile/<id>/process_<i>.trace.json.gz  the same, as trace-event JSON
  <workdir>/profile/<id>/process_<i>.started.json     {"start_step", "time"}: the capture has begun
  <workdir>/profile/<id>/process_<i>.digest.json      the digest, written last: the capture is done

(`python -m xprof.server --logdir=<workdir>/profile`, or TensorBoard with xprof installed, shows each
request as a run.)

The digest splits the captured wall-clock time of each device into matmuls, the RG-LRU scan,
collectives, other device ops, waiting for data and idle; the shares sum to 100%. It is computed from
the `.xplane.pb` itself: device ops are the events XLA names by HLO instruction (a device plane's
"XLA Ops" line, or the host events of the CPU runtime with an `hlo_op` stat), classified by the HLO
module the trace carries (opcode, fused computation, `linear_scan` name scope), by name when the
module is missing; data wait is the trainer's `data_wait` annotation around its batch fetch. Where
several classes overlap in time (the CPU runtime's threads), the instant counts once, for the first
class in `CATEGORIES`.

This module imports neither jax nor TensorFlow at import time (`launch.profile` reads its files).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Iterable, Sequence

from recurrentgemma_tpu import workdir as workdir_lib

# How often a training process looks for a request: one read of request.json per process (a
# bucket read of ~50 ms on gs://, hidden while the device runs the queued steps) every POLL_S.
POLL_S = 5.0
# Longest capture: traces of more than ~30 s lose device ops (jax#23446) and grow large.
MAX_STEPS = 100
# Time classes, in the order an instant claimed by several is given to (the scan kernel and
# collectives are what a digest is read for; "other" is every remaining device op).
CATEGORIES = ("scan", "collective", "matmul", "other", "data_wait", "idle")
OP_CLASSES = CATEGORIES[:4]  # the classes of device ops
DATA_WAIT = "data_wait"  # the TraceAnnotation around the trainer's batch fetch
_ABSOLUTE_NS = 10**17  # a trace time at least this large is unix ns (1973 on), else session-relative

_COLLECTIVE_OPCODES = frozenset({
    "all-reduce", "all-reduce-start", "all-reduce-done", "all-gather", "all-gather-start",
    "all-gather-done", "reduce-scatter", "collective-permute", "collective-permute-start",
    "collective-permute-done", "all-to-all", "ragged-all-to-all", "collective-broadcast", "send",
    "send-done", "recv", "recv-done"})
_MATMUL_OPCODES = frozenset({"dot", "convolution", "ragged-dot", "scaled-dot"})
_COLLECTIVE_NAME = re.compile(
    r"all[-_]reduce|all[-_]gather|reduce[-_]scatter|collective[-_]permute|all[-_]to[-_]all|"
    r"collective[-_]broadcast|^send|^recv|megascale")
_MATMUL_NAME = re.compile(r"^dot|^convolution|matmul|gemm|cublas|onednn")
_SCAN_NAME = re.compile(r"linear_scan")


# ------------------------------------------------------------------------------------ files


def request_path(workdir: str) -> str:
  return workdir_lib.join(workdir, workdir_lib.PROFILE_DIR, "request.json")


def capture_dir(workdir: str, request_id: str) -> str:
  """The TensorBoard log directory of one request."""
  return workdir_lib.join(workdir, workdir_lib.PROFILE_DIR, request_id)


def session_dir(workdir: str, request_id: str) -> str:
  """Where the trace files of every process of one request go (one profiler session, one file
  prefix per process)."""
  return workdir_lib.join(capture_dir(workdir, request_id), "plugins", "profile", request_id)


def started_path(workdir: str, request_id: str, process: int) -> str:
  return workdir_lib.join(capture_dir(workdir, request_id), f"process_{process}.started.json")


def digest_path(workdir: str, request_id: str, process: int) -> str:
  return workdir_lib.join(capture_dir(workdir, request_id), f"process_{process}.digest.json")


@dataclasses.dataclass(frozen=True)
class Request:
  """What `launch.profile` asks for (request.json)."""

  id: str
  steps: int
  process: int | None  # None: every process
  predicted_step_s: float | None = None  # the planner's prediction for the run, if any
  prediction: str = ""  # where the prediction came from, or why there is none
  time: float = 0.0

  def wants(self, process_index: int) -> bool:
    return self.process is None or self.process == process_index

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)


def new_request_id(now: float | None = None) -> str:
  """A request id that sorts by time and names the requester (`20261207-114416-12345`)."""
  now = time.time() if now is None else now
  return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{os.getpid()}"


def write_request(workdir: str, request: Request) -> None:
  workdir_lib.write_text(request_path(workdir), request.to_json(), tmp_suffix=f".tmp{os.getpid()}")


def read_request(workdir: str) -> Request | None:
  """The current request, or None (no file, or a torn or foreign one)."""
  try:
    text = workdir_lib.read_text_if_exists(request_path(workdir))
  except Exception:  # pylint: disable=broad-except
    return None  # a bucket hiccup: look again at the next poll
  if not text:
    return None
  try:
    d = json.loads(text)
    return Request(id=str(d["id"]), steps=int(d["steps"]),
                   process=None if d.get("process") is None else int(d["process"]),
                   predicted_step_s=(None if d.get("predicted_step_s") is None
                                     else float(d["predicted_step_s"])),
                   prediction=str(d.get("prediction", "")), time=float(d.get("time", 0.0)))
  except (ValueError, KeyError, TypeError):
    return None


def read_json(path: str) -> dict[str, Any] | None:
  text = workdir_lib.read_text_if_exists(path)
  try:
    return json.loads(text) if text else None
  except ValueError:
    return None


# ------------------------------------------------------------------------------------ the digest


@dataclasses.dataclass(frozen=True)
class OpEvent:
  """One device op in a trace: its HLO instruction name, module, device and interval (ns)."""

  name: str
  module: str
  device: str
  start_ns: float
  end_ns: float


@dataclasses.dataclass(frozen=True)
class HloOp:
  """What an HLO instruction is, for classification: its opcode, the opcodes it fuses, its jax name
  stack (`metadata.op_name`) and a custom call's target."""

  opcode: str
  fused: frozenset[str] = frozenset()
  op_name: str = ""
  target: str = ""


def classify(name: str, hlo: HloOp | None) -> str:
  """The class of a device op (`scan`, `collective`, `matmul` or `other`), from its HLO
  instruction when the trace carries its module, else from its name."""
  if hlo is None:
    if _SCAN_NAME.search(name):
      return "scan"
    if _COLLECTIVE_NAME.search(name):
      return "collective"
    return "matmul" if _MATMUL_NAME.search(name) else "other"
  opcodes = {hlo.opcode} | hlo.fused
  if _SCAN_NAME.search(hlo.op_name) or _SCAN_NAME.search(hlo.target) or _SCAN_NAME.search(name):
    return "scan"
  if opcodes & _COLLECTIVE_OPCODES:
    return "collective"
  if opcodes & _MATMUL_OPCODES or _MATMUL_NAME.search(hlo.target):
    return "matmul"
  return "other"


def exclusive_times(intervals: dict[str, Sequence[tuple[float, float]]], start: float,
                    end: float) -> dict[str, float]:
  """Splits [start, end] among classes: each instant goes to the first class of CATEGORIES that
  has an interval covering it, else to "idle". The values sum to end - start."""
  points = []
  for category, spans in intervals.items():
    rank = CATEGORIES.index(category)
    for a, b in spans:
      a, b = max(a, start), min(b, end)
      if b > a:
        points.append((a, 1, rank))
        points.append((b, -1, rank))
  points.sort()
  active = [0] * len(CATEGORIES)
  out = dict.fromkeys(CATEGORIES, 0.0)
  t = start
  for when, delta, rank in points:
    if when > t:
      owner = next((i for i, n in enumerate(active) if n), CATEGORIES.index("idle"))
      out[CATEGORIES[owner]] += when - t
      t = when
    active[rank] += delta
  out["idle"] += max(end - t, 0.0)
  return out


def _lookup(modules: dict[str, dict[str, HloOp]], op: OpEvent) -> HloOp | None:
  """The op's HLO instruction: in its module, or (a trace that does not name the module, like a
  TPU's "XLA Ops" line) in the train step's module first, then any module that has the name."""
  if op.module in modules:
    return modules[op.module].get(op.name)
  for name in sorted(modules, key=lambda m: "train_step" not in m):
    if op.name in modules[name]:
      return modules[name][op.name]
  return None


def digest_events(ops: Iterable[OpEvent], data_waits: Sequence[tuple[float, float]],
                  modules: dict[str, dict[str, HloOp]], start_ns: float,
                  end_ns: float) -> dict[str, Any]:
  """Shares of [start_ns, end_ns] per class, averaged over the devices that ran ops (each device
  shares the host's data waits); also each class's heaviest ops."""
  per_device: dict[str, dict[str, list[tuple[float, float]]]] = {}
  heaviest: dict[str, dict[str, float]] = {c: {} for c in OP_CLASSES}
  for op in ops:
    category = classify(op.name, _lookup(modules, op))
    per_device.setdefault(op.device, {c: [] for c in OP_CLASSES})[category].append(
        (op.start_ns, op.end_ns))
    heaviest[category][op.name] = heaviest[category].get(op.name, 0.0) + (op.end_ns - op.start_ns)
  window = max(end_ns - start_ns, 1e-9)
  devices = sorted(per_device) or ["host"]
  totals = dict.fromkeys(CATEGORIES, 0.0)
  for device in devices:
    spans = dict(per_device.get(device, {}))
    spans[DATA_WAIT] = list(data_waits)
    for category, ns in exclusive_times(spans, start_ns, end_ns).items():
      totals[category] += ns / len(devices)
  shares = {c: totals[c] / window for c in CATEGORIES}
  top = {c: [name for name, _ in sorted(d.items(), key=lambda kv: -kv[1])[:3]]
         for c, d in heaviest.items() if d}
  return {"shares": shares, "devices": len(per_device), "top_ops": top}


# ------------------------------------------------------------------------------------ xplane


def _stat_value(stat, plane) -> Any:
  kind = stat.WhichOneof("value")
  if kind == "ref_value":
    return plane.stat_metadata[stat.ref_value].name
  return getattr(stat, kind) if kind else None


def _hlo_ops(hlo_proto_bytes: bytes) -> tuple[str, dict[str, HloOp]]:
  """(module name, instruction name -> HloOp) of a serialized xla.HloProto."""
  from tensorflow.compiler.xla.service import hlo_pb2  # pylint: disable=g-import-not-at-top
  proto = hlo_pb2.HloProto()
  proto.ParseFromString(hlo_proto_bytes)
  module = proto.hlo_module
  computations = {c.id: c for c in module.computations}

  def fused_opcodes(instruction, depth=0) -> set[str]:
    out = set()
    if depth > 4:
      return out
    for cid in instruction.called_computation_ids:
      if instruction.opcode in ("fusion", "custom-call", "async-start", "call"):
        for inner in computations[cid].instructions if cid in computations else ():
          out.add(inner.opcode)
          out |= fused_opcodes(inner, depth + 1)
    return out

  ops = {}
  for computation in module.computations:
    for ins in computation.instructions:
      ops[ins.name] = HloOp(ins.opcode, frozenset(fused_opcodes(ins)), ins.metadata.op_name,
                            ins.custom_call_target)
  return module.name, ops


def read_xspace(path: str):
  """The XSpace proto of an `.xplane.pb` file."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  return space


def digest_xspace(space, start_ns: float | None = None, end_ns: float | None = None) -> dict[str, Any]:
  """The digest of a captured XSpace over [start_ns, end_ns] (default: the whole capture)."""
  modules: dict[str, dict[str, HloOp]] = {}
  ops: list[OpEvent] = []
  waits: list[tuple[float, float]] = []
  env: dict[str, Any] = {}
  for plane in space.planes:
    if plane.name == "Task Environment":
      env = {plane.stat_metadata[s.metadata_id].name: _stat_value(s, plane) for s in plane.stats}
  # Times are kept relative to the session's start (profile_start_time, unix ns), as the exporter
  # writes most lines; unix ns do not fit a float exactly.
  origin = int(env.get("profile_start_time") or start_ns or 0)
  start_ns = None if start_ns is None else int(start_ns) - origin
  end_ns = None if end_ns is None else int(end_ns) - origin
  if start_ns is None and "profile_start_time" in env:
    start_ns = 0
  if end_ns is None and "profile_stop_time" in env:
    end_ns = int(env["profile_stop_time"]) - origin
  for plane in space.planes:
    stat_names = {k: m.name for k, m in plane.stat_metadata.items()}
    if plane.name == "/host:metadata":
      for meta in plane.event_metadata.values():
        for stat in meta.stats:
          if stat_names.get(stat.metadata_id) == "Hlo Proto" and stat.bytes_value:
            name, table = _hlo_ops(stat.bytes_value)
            modules[name] = table
      continue
    device_plane = plane.name.startswith("/device:") and "CUSTOM" not in plane.name
    for line in plane.lines:
      on_ops_line = device_plane and line.name == "XLA Ops"
      base = line.timestamp_ns - (origin if line.timestamp_ns >= _ABSOLUTE_NS else 0)
      for event in line.events:
        meta = plane.event_metadata[event.metadata_id]
        begin = base + event.offset_ps / 1e3
        finish = begin + event.duration_ps / 1e3
        if meta.name == DATA_WAIT and not device_plane:
          waits.append((begin, finish))
          continue
        stats = {stat_names.get(s.metadata_id): _stat_value(s, plane)
                 for s in list(meta.stats) + list(event.stats)}
        if not (on_ops_line or "hlo_op" in stats):
          continue
        name = str(stats.get("hlo_op") or meta.name)
        device = plane.name if device_plane else f"{plane.name}:{stats.get('device_ordinal', 0)}"
        ops.append(OpEvent(name, str(stats.get("hlo_module", "")), device, begin, finish))
  if start_ns is None or end_ns is None:
    times = [t for op in ops for t in (op.start_ns, op.end_ns)] + [t for w in waits for t in w]
    start_ns = start_ns if start_ns is not None else min(times, default=0.0)
    end_ns = end_ns if end_ns is not None else max(times, default=0.0)
  out = digest_events(ops, waits, modules, float(start_ns), float(end_ns))
  out["window_s"] = (float(end_ns) - float(start_ns)) / 1e9
  out["hlo_modules"] = len(modules)
  return out


def format_digest(digest: dict[str, Any]) -> str:
  """The digest as the few lines `launch.profile` prints."""
  shares = digest["shares"]
  # Numbered as metrics.jsonl numbers them (the step count after each step).
  lines = [f"process {digest['process']}: steps {digest['start_step'] + 1}..{digest['end_step']} "
           f"({digest['steps']} steps, {digest['devices']} device(s))"]
  labels = {"matmul": "matmuls", "scan": "scan kernel (RG-LRU)", "collective": "collectives",
            "other": "other device ops", "data_wait": "data wait", "idle": "idle"}
  for c in ("matmul", "scan", "collective", "other", "data_wait", "idle"):
    top = digest.get("top_ops", {}).get(c)
    lines.append(f"  {labels[c] + ':':<22}{100 * shares[c]:5.1f}%"
                 + (f"   ({', '.join(top)})" if top else ""))
  lines.append(f"  {'total:':<22}{100 * sum(shares.values()):5.1f}%")
  measured = digest["step_time_s"]
  predicted = digest.get("predicted_step_s")
  if predicted:
    lines.append(f"  step time: {measured:.4g} s measured, {predicted:.4g} s predicted by the "
                 f"planner (x{measured / predicted:.3g}; {digest.get('prediction', '')})")
  else:
    lines.append(f"  step time: {measured:.4g} s measured; no prediction "
                 f"({digest.get('prediction') or 'the planner predicted none for this run'})")
  lines.append(f"  trace: {digest['trace']}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------ the trainer side


class OnDemand:
  """The trainer's side: polls the request file at step boundaries and captures N steps.

  `step_boundary(step, pending)` is called after each step is dispatched (`pending`: arrays of
  steps still running on the device, waited for so that the capture holds exactly its steps);
  `finish(step)` ends a capture cut short by the end of training or a preemption. Never raises: a
  failed capture is logged and written as a digest with an `error`, and training goes on.
  """

  def __init__(self, workdir: str, process_index: int, *, poll_s: float = POLL_S):
    self.workdir, self.process, self.poll_s = workdir, process_index, poll_s
    self._last_poll = -float("inf")
    self._seen: set[str] = set()
    self._capture: dict[str, Any] | None = None

  def step_boundary(self, step: int, pending: Iterable[Any] = ()) -> None:
    if self._capture is not None:
      if step - self._capture["start_step"] >= self._capture["request"].steps:
        self._stop(step, pending)
      return
    now = time.monotonic()
    if now - self._last_poll < self.poll_s:
      return
    self._last_poll = now
    request = read_request(self.workdir)
    if request is None or request.id in self._seen:
      return
    self._seen.add(request.id)
    try:
      if request.wants(self.process) and not workdir_lib.exists(
          digest_path(self.workdir, request.id, self.process)):  # not captured before a restart
        self._start(request, step, pending)
    except Exception as e:  # pylint: disable=broad-except
      self._failed(request, e)

  def finish(self, step: int, pending: Iterable[Any] = ()) -> None:
    """Ends a capture still running (training ended or was preempted inside it)."""
    if self._capture is not None:
      self._stop(step, pending)

  def _start(self, request: Request, step: int, pending: Iterable[Any]) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    jax.block_until_ready(list(pending))  # the capture starts on an idle device
    local = tempfile.mkdtemp(prefix=f"rg_profile_{request.id}_")
    try:
      jax.profiler.start_trace(local)
    except Exception:
      shutil.rmtree(local, ignore_errors=True)
      raise
    self._capture = {"request": request, "start_step": step, "local": local,
                     "start_ns": time.time_ns(), "start": time.perf_counter()}
    workdir_lib.write_text(started_path(self.workdir, request.id, self.process),
                           json.dumps({"start_step": step, "steps": request.steps,
                                       "time": time.time()}))

  def _stop(self, step: int, pending: Iterable[Any]) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    capture, self._capture = self._capture, None
    request: Request = capture["request"]
    try:
      jax.block_until_ready(list(pending))
      seconds = time.perf_counter() - capture["start"]
      end_ns = time.time_ns()
      jax.profiler.stop_trace()
      xplane = _only(capture["local"], ".xplane.pb")
      steps = step - capture["start_step"]
      digest = digest_xspace(read_xspace(xplane), capture["start_ns"], end_ns)
      dest = session_dir(self.workdir, request.id)
      for suffix in (".xplane.pb", ".trace.json.gz"):
        found = _only(capture["local"], suffix, required=suffix == ".xplane.pb")
        if found:
          workdir_lib.copy(found, workdir_lib.join(dest, f"process_{self.process}{suffix}"))
      digest.update({
          "id": request.id, "process": self.process, "start_step": capture["start_step"],
          "end_step": step, "steps": steps, "seconds": seconds,
          "step_time_s": seconds / max(steps, 1), "predicted_step_s": request.predicted_step_s,
          "prediction": request.prediction,
          "trace": workdir_lib.join(dest, f"process_{self.process}.xplane.pb"),
          # Training paused this long after the window to write the trace and digest it.
          "overhead_s": time.perf_counter() - capture["start"] - seconds})
      workdir_lib.write_text(digest_path(self.workdir, request.id, self.process),
                             json.dumps(digest, indent=1))
    except Exception as e:  # pylint: disable=broad-except
      try:
        jax.profiler.stop_trace()
      except RuntimeError:
        pass  # already stopped
      self._failed(request, e)
    finally:
      shutil.rmtree(capture["local"], ignore_errors=True)

  def _failed(self, request: Request, error: Exception) -> None:
    """Logs a failed capture and records it as the request's digest, so the command stops waiting."""
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning("Profile %s failed (training goes on): %s: %s", request.id,
                    type(error).__name__, error)
    try:
      workdir_lib.write_text(digest_path(self.workdir, request.id, self.process),
                             json.dumps({"error": f"{type(error).__name__}: {error}",
                                         "process": self.process}))
    except Exception:  # pylint: disable=broad-except
      pass  # the workdir itself is failing; the trainer will say so at its next write


def _only(directory: str, suffix: str, required: bool = True) -> str | None:
  """The one file under `directory` (jax's plugins/profile/<session>/) ending in `suffix`."""
  found = [os.path.join(root, f) for root, _, files in os.walk(directory) for f in files
           if f.endswith(suffix)]
  if len(found) == 1:
    return found[0]
  if not required and not found:
    return None
  raise RuntimeError(f"expected one *{suffix} in the profiler's output, found {found}")
