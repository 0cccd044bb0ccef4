"""Ahead-of-time fit planning for TPU topologies, on a CPU host.

Library half of `python -m recurrentgemma_tpu.compile` (which builds the real train step and calls in
here); nothing in this file imports the training code. The flow:

  topology string -> TPU devices (libtpu, no TPU needed) -> mesh -> lower + compile the step ->
  `CompileReport` (per-chip memory from `memory_analysis()`, matmul FLOPs read from the compiled HLO,
  fit against the chip table's HBM) -> `format_report`.

`search` ranks candidate plans (mesh factorisation x remat policy x micro-batch count) by
`estimate_step`, an analytic step-time model described in docs/sharding.md, and compiles them in that
order, so the plans it prints as fitting are proven by the compiler and ordered by estimated cost.
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
  chip, shape = chips_lib.parse_topology(topology)
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
  return CompileReport(
      topology=topology, num_slices=num_slices, chip=chip, devices_per_chip=k, mesh=dict(mesh),
      argument_bytes=k * mem.argument_size_in_bytes, output_bytes=k * mem.output_size_in_bytes,
      alias_bytes=k * mem.alias_size_in_bytes, temp_bytes=k * mem.temp_size_in_bytes,
      code_bytes=k * mem.generated_code_size_in_bytes, compiled_flops=k * flops.flops,
      xla_flops=k * float(cost.get("flops", 0.0)), flops_exact=flops.exact,
      six_nd_per_chip=six_nd / n_chips, max_hbm_fraction=max_hbm_fraction,
      compile_seconds=compile_seconds)


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
      f"at peak bf16 the step's matmuls take >= {r.compiled_flops / r.chip.peak_bf16_flops * 1e3:.1f} ms",
      f"FITS: {'yes' if r.fits else 'NO'}",
  ]
  return "\n".join(lines)


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


def format_search(results: list[SearchResult], limit: int = 20) -> str:
  """Table of the search: fitting plans first (by estimate), then the rest that were tried."""
  header = (f"{'rank':>4} {'data x fsdp x seq x model':>26} {'remat':>13} {'micro':>5} {'est. step':>10} "
            f"{'compute':>8} {'TP':>7} {'ZeRO':>7} {'DCN':>7} {'mem/chip':>10} status")
  rows = [header]
  ordered = [r for r in results if r.status == "fits"] + [
      r for r in results if r.status not in ("fits", "not compiled")]
  for i, r in enumerate(ordered[:limit]):
    e = r.estimate
    mem = _gib(r.report.total_bytes) if r.report else "-"
    rows.append(f"{i + 1:>4} {r.plan.mesh_str():>26} {r.plan.remat:>13} {r.plan.num_microbatches:>5} "
                f"{e.step_s * 1e3:>8.1f}ms {e.compute_s * 1e3:>6.0f}ms {e.tp_s * 1e3:>5.0f}ms "
                f"{e.fsdp_s * 1e3:>5.0f}ms {e.dcn_s * 1e3:>5.0f}ms {mem:>10} {r.status}")
  untried = sum(r.status == "not compiled" for r in results)
  rows.append(f"{len(results)} candidate plans; {untried} not compiled (ranked below the ones tried)")
  return "\n".join(rows)
