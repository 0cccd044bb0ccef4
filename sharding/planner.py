"""Ahead-of-time fit planning for TPU topologies, on a CPU host.

Library half of `python -m recurrentgemma_tpu.compile` (which builds the real train step and calls in
here); nothing in this file imports the training code. The flow:

  topology string -> TPU devices (libtpu, no TPU needed) -> mesh -> lower + compile the step ->
  `CompileReport` (per-chip memory from `memory_analysis()`, matmul FLOPs read from the compiled HLO,
  fit against the chip table's HBM) -> `format_report`.

`search` orders candidate plans (mesh factorisation x remat policy x micro-batch count) by
`estimate_step`, a cheap analytic estimate, compiles them in that order, and ranks the ones that fit
by `step_time`: the step-time model applied to each compiled program (FLOPs against peak, HBM bytes
against bandwidth, every collective against ICI / DCN bandwidth; docs/sharding.md, "Step-time model").
"""

import dataclasses
import itertools
import math
import os
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from sharding import chips as chips_lib
from sharding import hlo as hlo_lib

REMAT_COST = {
    # Extra forward passes recomputed in the backward pass, as a fraction of one forward.
    "none": 0.0,
    "dots": 0.05,  # matmul outputs saved; only element-wise work is recomputed
    "dots_no_batch": 0.15,  # also recomputes the batched (attention score) matmuls
    "block": 1.0,  # every block's forward runs again in the backward pass
}
# Activation bytes saved per token per layer for the backward pass, in units of width * 2 bytes
# (bf16); coarse figures used only to skip hopeless candidates before compiling, never to decide fit.
_REMAT_SAVED_WIDTHS = {"none": 30.0, "dots_no_batch": 14.0, "dots": 12.0, "block": 1.0}


def topology_devices(topology: str, num_slices: int = 1) -> tuple[chips_lib.Chip, list[Any], int]:
  """TPU devices of `num_slices` slices of `topology`, available on a CPU host through libtpu.

  Returns:
    (chip, devices, devices_per_chip). v4 topologies expose one device per TensorCore (2 per chip);
    the others one per chip.
  """
  target = chips_lib.parse_target(topology)
  chip, shape, topology = target.chip, target.shape, target.topology_name
  if num_slices < 1:
    raise ValueError(f"num_slices={num_slices} must be >= 1")
  # Compiling for a topology never touches a TPU, so several planner processes (a search, a test run,
  # a colleague's compile) may share libtpu; without this the second one fails on libtpu's lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  devices = list(topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices)
  num_chips = math.prod(shape) * num_slices
  if len(devices) % num_chips:
    raise ValueError(f"topology {topology} x {num_slices} gave {len(devices)} devices for {num_chips} chips")
  if devices[0].device_kind != chip.device_kind:
    raise ValueError(f"topology {topology} gave devices of kind {devices[0].device_kind!r}, the chip "
                     f"table expects {chip.device_kind!r}")
  return chip, devices, len(devices) // num_chips


@dataclasses.dataclass(frozen=True)
class ModelStats:
  """What the estimate needs to know about a model and a batch (built by the compile CLI)."""

  num_params: int
  width: int
  num_layers: int
  vocab_size: int
  matmul_flops_per_token: float  # forward matmul FLOPs per token, attention included
  global_batch: int
  seq_len: int
  param_bytes: int = 4  # bytes per parameter as stored
  opt_bytes_per_param: int = 8  # Adam moments

  @property
  def tokens(self) -> int:
    return self.global_batch * self.seq_len

  @property
  def six_nd(self) -> float:
    return 6.0 * self.num_params * self.tokens


@dataclasses.dataclass(frozen=True)
class Plan:
  """One candidate: mesh axis sizes within a slice, remat policy, micro-batch count."""

  data: int
  fsdp: int
  seq: int
  model: int
  remat: str
  num_microbatches: int

  def mesh_str(self) -> str:
    return f"{self.data}x{self.fsdp}x{self.seq}x{self.model}"


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Estimated seconds per step, by component (see docs/sharding.md, "Step-cost estimate")."""

  compute_s: float
  tp_s: float
  seq_s: float
  fsdp_s: float
  dp_s: float
  dcn_s: float
  memory_bytes: float  # coarse per-device memory, only for pruning

  @property
  def step_s(self) -> float:
    # Tensor- and sequence-parallel collectives sit between dependent matmuls: exposed. ZeRO
    # gathers / reduce-scatters and the data-parallel reduction overlap with compute (XLA's async
    # collectives); the DCN reduction happens after the last gradient and is exposed.
    return max(self.compute_s, self.fsdp_s + self.dp_s) + self.tp_s + self.seq_s + self.dcn_s


def estimate_step(plan: Plan, stats: ModelStats, chip: chips_lib.Chip, num_slices: int,
                  devices_per_chip: int = 1) -> Estimate:
  """Analytic step time of `plan` on `num_slices` slices of `chip` (used to rank, not to promise)."""
  n_dev = plan.data * plan.fsdp * plan.seq * plan.model * num_slices
  peak = chip.peak_bf16_flops / devices_per_chip
  # One torus dimension, both directions: the bandwidth a ring collective along one mesh axis gets.
  axis_bw = 2 * chip.ici_link_bandwidth / devices_per_chip
  fwd = stats.matmul_flops_per_token * stats.tokens
  compute = fwd * (3.0 + REMAT_COST[plan.remat]) / (n_dev * peak)

  batch_shards = plan.data * plan.fsdp * num_slices
  tokens_local = stats.tokens / (batch_shards * plan.seq)
  act_bytes = tokens_local * stats.width * 2  # one [tokens, width] bf16 activation on a device

  def ring(nbytes: float, n: int, bw: float, all_reduce: bool = False) -> float:
    return 0.0 if n == 1 else (2.0 if all_reduce else 1.0) * nbytes * (n - 1) / n / bw

  # Megatron: 2 all-reduces forward and 2 backward per residual block (temporal mix and MLP), plus 2
  # when the forward is recomputed.
  tp_per_layer = 4 + (2 if plan.remat == "block" else 0)
  tp = stats.num_layers * tp_per_layer * ring(act_bytes, plan.model, axis_bw, all_reduce=True)
  # Sequence parallelism: about two activation-sized exchanges per layer and direction (conv/
  # attention context and the recurrence's carried state, gathered along time by the partitioner).
  seq = stats.num_layers * 4 * ring(act_bytes, plan.seq, axis_bw)
  param_bytes_local = stats.num_params * stats.param_bytes / plan.model
  # ZeRO-3 per micro-batch: gather for the forward, gather again for the backward, reduce-scatter.
  fsdp = plan.num_microbatches * 3 * ring(param_bytes_local, plan.fsdp, axis_bw)
  grad_shard = param_bytes_local / plan.fsdp
  dp = ring(grad_shard, plan.data, axis_bw, all_reduce=True)
  dcn = ring(grad_shard / plan.data, num_slices, chip.dcn_bandwidth / devices_per_chip, all_reduce=True)

  state = stats.num_params * (stats.param_bytes * 2 + stats.opt_bytes_per_param) / (plan.fsdp * plan.model)
  micro_tokens = tokens_local / plan.num_microbatches
  acts = micro_tokens * stats.width * 2 * stats.num_layers * _REMAT_SAVED_WIDTHS[plan.remat] / plan.model
  logits = micro_tokens * stats.vocab_size / plan.model * 4 * 3
  return Estimate(compute, tp, seq, fsdp, dp, dcn, state + acts + logits)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def candidate_plans(devices_per_slice: int, num_slices: int, global_batch: int, seq_len: int,
                    remats: Sequence[str], microbatches: Sequence[int], max_model: int = 16,
                    max_seq: int = 4, allow_data: bool = True,
                    valid: Optional[Callable[[Plan], Optional[str]]] = None) -> tuple[list[Plan], list[str]]:
  """Every (data, fsdp, seq, model) factorisation of a slice with each remat / micro-batch choice.

  `valid(plan)` may return a reason to reject a plan (e.g. gate blocks not divisible by `model`);
  those reasons are returned too, one per distinct message, so a user sees why a shape is missing.
  """
  plans, reasons = [], {}
  for model, seq in itertools.product(_divisors(devices_per_slice), repeat=2):
    if model > max_model or seq > max_seq or devices_per_slice % (model * seq):
      continue
    rest = devices_per_slice // (model * seq)
    for data in (_divisors(rest) if allow_data else [1]):
      fsdp = rest // data
      for remat, k in itertools.product(remats, microbatches):
        plan = Plan(data, fsdp, seq, model, remat, k)
        batch_shards = data * fsdp * num_slices
        if global_batch % k or (global_batch // k) % batch_shards or seq_len % seq:
          continue
        why = valid(plan) if valid else None
        if why:
          reasons.setdefault(why, plan)
          continue
        plans.append(plan)
  return plans, [f"{p.mesh_str()}: {w}" for w, p in reasons.items()]


@dataclasses.dataclass
class CompileReport:
  """Per-chip outcome of compiling one plan for a topology."""

  topology: str
  num_slices: int
  chip: chips_lib.Chip
  devices_per_chip: int
  mesh: dict[str, int]
  argument_bytes: int  # per chip
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  compiled_flops: float  # per chip, matmuls, loop trip counts applied
  xla_flops: float  # per chip, XLA's own cost analysis (counts each loop body once)
  flops_exact: bool
  six_nd_per_chip: float
  max_hbm_fraction: float
  compile_seconds: float
  step: Optional["StepTime"] = None  # the step-time model on the compiled program

  @property
  def mfu(self) -> float:
    """Estimated model-FLOP utilisation by 6ND at the estimated step time (nan without an estimate)."""
    if self.step is None or not self.step.step_s:
      return float("nan")
    return self.six_nd_per_chip / (self.step.step_s * self.chip.peak_bf16_flops)

  @property
  def total_bytes(self) -> int:
    # Donated inputs alias outputs: they occupy HBM once.
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

  @property
  def hbm_bytes(self) -> int:
    return self.chip.hbm_bytes

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.max_hbm_fraction * self.hbm_bytes

  @property
  def flops_ratio(self) -> float:
    return self.compiled_flops / self.six_nd_per_chip if self.six_nd_per_chip else float("nan")


@dataclasses.dataclass(frozen=True)
class StepTime:
  """Estimated seconds per step of a compiled program, per chip (docs/sharding.md, "Step-time model").

  compute_s: matmul FLOPs (loop trip counts applied) at the chip's bf16 peak.
  memory_s: bytes every top-level HLO instruction reads and writes, at the chip's HBM bandwidth.
  ici_s / dcn_s: every collective's ring time on ICI / across the DCN `slice` axis, not overlapped.
  """

  compute_s: float
  memory_s: float
  ici_s: float
  dcn_s: float
  collective_bytes: float  # per device per step, all collectives' payloads
  exact: bool  # every loop trip count was read

  @property
  def step_s(self) -> float:
    """No overlap of communication with computation; compute and memory traffic overlap (roofline)."""
    return max(self.compute_s, self.memory_s) + self.ici_s + self.dcn_s

  @property
  def overlapped_s(self) -> float:
    """Perfect overlap: the lower bound of the same figures."""
    return max(self.compute_s, self.memory_s, self.ici_s + self.dcn_s)


# Bytes each device sends per payload byte over a ring of n, as (n - 1) / n times this factor.
_RING_FACTOR = {"all-reduce": 2.0, "all-gather": 1.0, "reduce-scatter": 1.0, "all-to-all": 1.0,
                "collective-broadcast": 1.0, "ragged-all-to-all": 1.0}


def collective_seconds(c: hlo_lib.Collective, chip: chips_lib.Chip,
                       devices_per_chip: int = 1) -> tuple[float, float]:
  """(ICI seconds, DCN seconds) of all executions of one collective on one device.

  A group of n devices over s slices runs hierarchically: a ring of n / s devices inside the slice
  at the bandwidth of one torus ring (both directions of one link), then a ring of s over DCN carrying
  the 1 / (n / s) share left on each device. A collective-permute sends its payload over one link.
  """
  ici_bw = 2 * chip.ici_link_bandwidth / devices_per_chip
  dcn_bw = chip.dcn_bandwidth / devices_per_chip
  if c.kind == "collective-permute":
    t = c.nbytes / (dcn_bw if c.num_slices > 1 else chip.ici_link_bandwidth / devices_per_chip)
    return (0.0, c.count * t) if c.num_slices > 1 else (c.count * t, 0.0)
  factor = _RING_FACTOR.get(c.kind, 1.0)
  s = max(c.num_slices, 1)
  n_ici = max(c.group_size // s, 1)
  ici = factor * c.nbytes * (n_ici - 1) / n_ici / ici_bw
  dcn = factor * (c.nbytes / n_ici) * (s - 1) / s / dcn_bw
  return c.count * ici, c.count * dcn


def step_time(hlo_text: str, chip: chips_lib.Chip, num_devices: int, num_slices: int,
              devices_per_chip: int = 1, flops: Optional[hlo_lib.FlopCount] = None) -> StepTime:
  """The step-time model on a compiled program's HLO text (per device, SPMD)."""
  flops = flops or hlo_lib.matmul_flops(hlo_text)
  traffic = hlo_lib.traffic(hlo_text, num_devices, num_slices)
  ici = dcn = 0.0
  for c in traffic.collectives:
    i, d = collective_seconds(c, chip, devices_per_chip)
    ici, dcn = ici + i, dcn + d
  k = devices_per_chip
  return StepTime(compute_s=flops.flops / (chip.peak_bf16_flops / k),
                  memory_s=traffic.hbm_bytes / (chip.hbm_bandwidth / k), ici_s=ici, dcn_s=dcn,
                  collective_bytes=sum(c.count * c.nbytes for c in traffic.collectives),
                  exact=flops.exact and traffic.exact)


def analyze(compiled: Any, *, topology: str, num_slices: int, chip: chips_lib.Chip,
            devices_per_chip: int, mesh: dict[str, int], six_nd: float, max_hbm_fraction: float,
            compile_seconds: float) -> CompileReport:
  """Per-chip memory and FLOPs of a compiled TPU executable."""
  mem = compiled.memory_analysis()
  hlo_text = compiled.as_text()
  flops = hlo_lib.matmul_flops(hlo_text)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n_chips = math.prod(mesh.values()) // devices_per_chip
  k = devices_per_chip
  step = step_time(hlo_text, chip, math.prod(mesh.values()), num_slices, k, flops)
  return CompileReport(
      topology=topology, num_slices=num_slices, chip=chip, devices_per_chip=k, mesh=dict(mesh),
      argument_bytes=k * mem.argument_size_in_bytes, output_bytes=k * mem.output_size_in_bytes,
      alias_bytes=k * mem.alias_size_in_bytes, temp_bytes=k * mem.temp_size_in_bytes,
      code_bytes=k * mem.generated_code_size_in_bytes, compiled_flops=k * flops.flops,
      xla_flops=k * float(cost.get("flops", 0.0)), flops_exact=flops.exact,
      six_nd_per_chip=six_nd / n_chips, max_hbm_fraction=max_hbm_fraction,
      compile_seconds=compile_seconds, step=step)


def _gib(n: float) -> str:
  return f"{n / chips_lib.GiB:.2f} GiB"


def format_report(r: CompileReport) -> str:
  """Human-readable per-chip report."""
  mesh = " ".join(f"{a}={s}" for a, s in r.mesh.items())
  lines = [
      f"topology {r.topology} x {r.num_slices} slice(s), chip {r.chip.name} "
      f"(HBM {_gib(r.hbm_bytes)}, peak {r.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16)",
      f"mesh: {mesh}",
      f"compiled in {r.compile_seconds:.1f} s",
      "per-chip memory:",
      f"  arguments   {_gib(r.argument_bytes)}  (of which {_gib(r.alias_bytes)} donated and reused for outputs)",
      f"  outputs     {_gib(r.output_bytes)}",
      f"  temporaries {_gib(r.temp_bytes)}",
      f"  code        {_gib(r.code_bytes)}",
      f"  total       {_gib(r.total_bytes)} = {100 * r.total_bytes / r.hbm_bytes:.1f}% of HBM "
      f"(limit {100 * r.max_hbm_fraction:.0f}%)",
      f"per-chip FLOPs per step: {r.compiled_flops:.4g} (matmuls in the compiled HLO"
      f"{'' if r.flops_exact else ', some loop trip counts unknown: a lower bound'}); "
      f"6*N*D per chip {r.six_nd_per_chip:.4g}; ratio {r.flops_ratio:.3f}",
      f"  (XLA cost_analysis, which counts each loop body once: {r.xla_flops:.4g})",
      f"at peak bf16 the step's matmuls take >= {r.compiled_flops / r.chip.peak_bf16_flops * 1e3:.3g} ms",
  ]
  if r.step is not None:
    s = r.step
    lines += [
        f"estimated step time {s.step_s * 1e3:.1f} ms (MFU {r.mfu:.1%} by 6ND): max(compute "
        f"{s.compute_s * 1e3:.1f}, HBM {s.memory_s * 1e3:.1f}) + ICI {s.ici_s * 1e3:.1f} + DCN "
        f"{s.dcn_s * 1e3:.1f} ms; with perfect overlap {s.overlapped_s * 1e3:.1f} ms"
        f"{'' if s.exact else ' (some loop trip counts unknown)'}",
        f"  collectives move {s.collective_bytes / chips_lib.GiB:.2f} GiB per chip per step",
    ]
  lines.append(f"FITS: {'yes' if r.fits else 'NO'}")
  return "\n".join(lines)


def report_summary(r: CompileReport) -> dict[str, Any]:
  """The verdict as plain numbers (the compile CLI's --report_json): fit, memory, predicted step."""
  return {"topology": r.topology, "num_slices": r.num_slices, "fits": r.fits,
          "total_bytes": r.total_bytes, "hbm_bytes": r.hbm_bytes,
          "step_s": r.step.step_s if r.step is not None else None,
          "mfu": r.mfu if r.step is not None else None}


@dataclasses.dataclass
class SearchResult:
  plan: Plan
  estimate: Estimate
  status: str  # "fits", "too big", "skipped (estimate)", "not compiled", "failed: ..."
  report: Optional[CompileReport] = None


def search(plans: Iterable[Plan], estimate: Callable[[Plan], Estimate],
           compile_plan: Callable[[Plan], CompileReport], hbm_budget: float, *, max_compiles: int,
           want: int, prune_factor: float = 1.5,
           log: Callable[[str], None] = print) -> list[SearchResult]:
  """Ranks plans by estimated step time and compiles them in that order.

  Plans whose coarse memory estimate exceeds `prune_factor` x the budget are skipped without
  compiling. Stops after `want` fitting plans or `max_compiles` compiles.

  Returns:
    every plan with its estimate and status, best estimate first.
  """
  results = sorted((SearchResult(p, estimate(p), "not compiled") for p in plans),
                   key=lambda r: r.estimate.step_s)
  compiled = fitting = 0
  for r in results:
    if fitting >= want or compiled >= max_compiles:
      break
    if r.estimate.memory_bytes > prune_factor * hbm_budget:
      r.status = "skipped (estimate)"
      continue
    compiled += 1
    t0 = time.time()
    try:
      r.report = compile_plan(r.plan)
    except Exception as e:  # pylint: disable=broad-except
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      r.status = ("too big" if "RESOURCE_EXHAUSTED" in str(e) or "memory" in msg.lower()
                  else f"failed: {msg[:120]}")
      log(f"  {r.plan.mesh_str()} remat={r.plan.remat} micro={r.plan.num_microbatches}: {r.status} "
          f"({time.time() - t0:.0f} s)")
      continue
    r.status = "fits" if r.report.fits else "too big"
    fitting += r.report.fits
    log(f"  {r.plan.mesh_str()} remat={r.plan.remat} micro={r.plan.num_microbatches}: {r.status}, "
        f"{_gib(r.report.total_bytes)} per chip ({time.time() - t0:.0f} s)")
  return results


def _compiled_step_s(r: SearchResult) -> float:
  return r.report.step.step_s if r.report is not None and r.report.step is not None else float("inf")


def format_search(results: list[SearchResult], limit: int = 20) -> str:
  """Table of the search: fitting plans first, ranked by the step-time model on their compiled
  programs, then the rest that were tried. `pre-est.` is the analytic estimate that chose the order
  of compiles."""
  header = (f"{'rank':>4} {'data x fsdp x seq x model':>26} {'remat':>13} {'micro':>5} {'est. step':>10} "
            f"{'MFU':>6} {'compute':>8} {'HBM':>7} {'ICI':>7} {'DCN':>7} {'pre-est.':>9} {'mem/chip':>10} "
            "status")
  rows = [header]
  ordered = sorted((r for r in results if r.status == "fits"), key=_compiled_step_s) + [
      r for r in results if r.status not in ("fits", "not compiled")]
  ms = lambda s: f"{s * 1e3:.0f}ms" if s >= 0.01 else f"{s * 1e3:.1f}ms"
  for i, r in enumerate(ordered[:limit]):
    e, rep = r.estimate, r.report
    mem = _gib(rep.total_bytes) if rep else "-"
    if rep is not None and rep.step is not None:
      st = rep.step
      cols = (f"{st.step_s * 1e3:>8.1f}ms {rep.mfu:>6.1%} {ms(st.compute_s):>8} {ms(st.memory_s):>7} "
              f"{ms(st.ici_s):>7} {ms(st.dcn_s):>7}")
    else:
      cols = f"{'-':>10} {'-':>6} {'-':>8} {'-':>7} {'-':>7} {'-':>7}"
    rows.append(f"{i + 1:>4} {r.plan.mesh_str():>26} {r.plan.remat:>13} {r.plan.num_microbatches:>5} "
                f"{cols} {ms(e.step_s):>9} {mem:>10} {r.status}")
  untried = sum(r.status == "not compiled" for r in results)
  rows.append(f"{len(results)} candidate plans; {untried} not compiled (ranked below the ones tried)")
  return "\n".join(rows)
