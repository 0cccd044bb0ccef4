"""Reading compiled (post-optimisation) HLO text: matmul FLOPs with loop trip counts, and collectives.

Why not `compiled.cost_analysis()["flops"]` alone: XLA's cost analysis counts the body of a `while`
loop once, whatever its trip count, so a model whose layers run under `lax.scan` (or a step that
accumulates micro-batches in a loop) is under-counted by the number of iterations. Here every
computation's dot / convolution FLOPs are counted and multiplied along the call graph by the trip
count of each enclosing loop, taken from XLA's `known_trip_count` annotation (CPU) or read from the
loop condition (`counter < constant`, the form `lax.scan` and `fori_loop` produce, counting from 0;
the TPU compiler drops the annotation). Convolutions (how TPU XLA writes most matmuls) count only the
window taps that land on real input, see `_conv_macs`. Only matrix products are counted, which is also
what 6 x params x tokens counts.
"""

import dataclasses
import math
import re
from typing import Optional

import numpy as np

_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
               "collective-broadcast", "ragged-all-to-all")


@dataclasses.dataclass
class Instruction:
  is_root: bool
  name: str
  shape: str  # the printed result shape, e.g. "bf16[4,32,256]{2,1,0}"
  opcode: str
  rest: str  # operands and attributes


@dataclasses.dataclass
class Computation:
  name: str
  is_entry: bool
  instructions: list[Instruction]

  def shape_of(self, name: str) -> Optional[tuple[int, ...]]:
    for ins in self.instructions:
      if ins.name == name:
        return _dims(ins.shape)
    return None


def _dims(shape: str) -> Optional[tuple[int, ...]]:
  m = _ARRAY.match(shape)
  if not m:
    return None
  return tuple(int(d) for d in m.group(1).split(",") if d)


def parse(hlo_text: str) -> dict[str, Computation]:
  """Splits HLO text into computations by name."""
  comps: dict[str, Computation] = {}
  current: Optional[Computation] = None
  for line in hlo_text.splitlines():
    header = _COMP_HEADER.match(line)
    if header and not line.startswith(" "):
      current = Computation(header.group(2), bool(header.group(1)), [])
      comps[current.name] = current
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is None:
      continue
    m = _INSTR.match(line)
    if m:
      current.instructions.append(Instruction(bool(m.group(1)), m.group(2), m.group(3), m.group(4),
                                              m.group(5)))
  return comps


def _operands(rest: str) -> list[str]:
  """Names of the operands (the leading parenthesised list of %refs)."""
  depth, out, token = 1, [], ""
  for ch in rest:
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
      if depth == 0:
        break
    token += ch
  for part in token.split(","):
    ref = re.search(r"%([\w.\-]+)\s*$", part.strip())
    if ref:
      out.append(ref.group(1))
  return out


def _instruction_flops(comp: Computation, ins: Instruction) -> float:
  out = _dims(ins.shape)
  if out is None:
    return 0.0
  ops = _operands(ins.rest)
  if ins.opcode == "dot":
    lhs = comp.shape_of(ops[0]) if ops else None
    cdims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
    if lhs is None or cdims is None:
      return 0.0
    k = math.prod(lhs[int(i)] for i in cdims.group(1).split(",") if i)
    return 2.0 * math.prod(out) * k
  if ins.opcode == "convolution":
    lhs = comp.shape_of(ops[0]) if ops else None
    kernel = comp.shape_of(ops[1]) if len(ops) > 1 else None
    if lhs is None or kernel is None:
      return 0.0
    return 2.0 * _conv_macs(lhs, kernel, out, ins.rest)
  return 0.0


def _window_field(rest: str, name: str, n: int, default: int) -> list[str]:
  m = re.search(rf"\b{name}=([\dx_\-]+)", rest)
  return m.group(1).split("x") if m else [str(default)] * n


def _valid_pairs(in_size: int, out_size: int, k: int, stride: int, lo: int, lhs_dil: int,
                 rhs_dil: int) -> int:
  """(output position, kernel tap) pairs of one spatial dim that read a real (not padded) input."""
  o = np.arange(out_size)[:, None]
  tap = np.arange(k)[None, :]
  q = o * stride + tap * rhs_dil - lo  # position in the dilated input
  valid = (q >= 0) & (q <= (in_size - 1) * lhs_dil) & (q % lhs_dil == 0)
  return int(valid.sum())


def _conv_macs(lhs: tuple[int, ...], kernel: tuple[int, ...], out: tuple[int, ...], rest: str) -> float:
  """Multiply-adds of an HLO convolution, counting only taps that land on real input.

  TPU XLA expresses batched matmuls as convolutions whose batch dimensions are spatial dims with a
  window and padding chosen so one tap per output position is real; counting window x output
  positions would overcount those by the window size, so padding and dilation are applied exactly.
  """
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
  if labels is None:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  spatial = sorted(c for c in lhs_l if c.isdigit())
  n = len(spatial)
  sizes = _window_field(rest, "size", n, 1)
  strides = _window_field(rest, "stride", n, 1)
  pads = _window_field(rest, "pad", n, 0)
  lhs_dil = _window_field(rest, "lhs_dilate", n, 1)
  rhs_dil = _window_field(rest, "rhs_dilate", n, 1)
  macs = float(out[out_l.index("b")] * out[out_l.index("f")] * kernel[rhs_l.index("i")])
  for j, d in enumerate(spatial):
    lo = int(pads[j].split("_")[0]) if "_" in pads[j] else 0
    macs *= _valid_pairs(lhs[lhs_l.index(d)], out[out_l.index(d)], int(sizes[j]), int(strides[j]),
                         lo, int(lhs_dil[j]), int(rhs_dil[j]))
  return macs


def _constant_value(comp: Computation, name: str) -> Optional[int]:
  """The integer value of a scalar constant (looking through copies and converts), else None."""
  for ins in comp.instructions:
    if ins.name != name:
      continue
    if ins.opcode == "constant":
      m = re.match(r"\s*(-?\d+)\)", ins.rest)
      return int(m.group(1)) if m else None
    if ins.opcode in ("copy", "convert", "bitcast"):
      ops = _operands(ins.rest)
      return _constant_value(comp, ops[0]) if ops else None
  return None


def _find(comp: Computation, name: str) -> Optional[Instruction]:
  return next((i for i in comp.instructions if i.name == name), None)


def _tuple_index(comp: Computation, name: str) -> Optional[int]:
  """K when `name` is get-tuple-element(param, index=K), looking through copies and converts."""
  ins = _find(comp, name)
  while ins is not None and ins.opcode in ("copy", "convert", "bitcast"):
    ops = _operands(ins.rest)
    ins = _find(comp, ops[0]) if ops else None
  if ins is None or ins.opcode != "get-tuple-element":
    return None
  m = re.search(r"index=(\d+)", ins.rest)
  return int(m.group(1)) if m else None


def trip_count(comps: dict[str, Computation], condition: str, body: Optional[str] = None,
               init_comp: Optional[Computation] = None, init_tuple: Optional[str] = None) -> Optional[int]:
  """Trip count of a loop whose condition is `counter < limit` (the form `lax.scan` and `fori_loop`
  produce, and XLA's windowed einsums, which may count in steps of 2).

  The counter's start is read from the while's operand tuple and its step from the body's update
  `counter + constant`; without a body the loop is assumed to count 0, 1, 2, ... (lax.scan).
  """
  comp = comps.get(condition)
  if comp is None:
    return None
  for ins in comp.instructions:
    is_lt = ins.opcode == "compare" and "direction=LT" in ins.rest
    if ins.opcode == "fusion":
      # The CPU backend wraps the compare in a fusion: look inside it for `param0 < param1`.
      callee = re.search(r"calls=%?([\w.\-]+)", ins.rest)
      inner = comps.get(callee.group(1)) if callee else None
      is_lt = inner is not None and any(i.opcode == "compare" and "direction=LT" in i.rest
                                        for i in inner.instructions)
    if not is_lt:
      continue
    ops = _operands(ins.rest)
    if len(ops) != 2:
      continue
    limit = _constant_value(comp, ops[1])
    if limit is None:
      continue
    if body is None:
      return limit
    index = _tuple_index(comp, ops[0])
    start, step = _counter_start(init_comp, init_tuple, index), _counter_step(comps.get(body), index)
    if index is None or start is None or step is None or step <= 0:
      return None
    return max(0, -(-(limit - start) // step))
  return None


def _counter_step(body: Optional[Computation], index: Optional[int]) -> Optional[int]:
  """The constant c in the body's `counter_out = counter_in + c` for tuple element `index`."""
  if body is None or index is None:
    return None
  root = next((i for i in body.instructions if i.opcode == "tuple" and i.is_root), None)
  if root is None:
    return None
  outs = _operands(root.rest)
  update = _find(body, outs[index]) if index < len(outs) else None
  while update is not None and update.opcode in ("copy", "convert", "bitcast"):
    update = _find(body, _operands(update.rest)[0])
  if update is None or update.opcode != "add":
    return None
  a, b = _operands(update.rest)
  for counter, const in ((a, b), (b, a)):
    if _tuple_index(body, counter) == index:
      return _constant_value(body, const)
  return None


def _counter_start(comp: Optional[Computation], init_tuple: Optional[str], index: Optional[int]) -> Optional[int]:
  """The counter's initial value: element `index` of the tuple passed to the while, if constant."""
  if comp is None or init_tuple is None or index is None:
    return None
  tup = _find(comp, init_tuple)
  if tup is None or tup.opcode != "tuple":
    return None
  elems = _operands(tup.rest)
  return _constant_value(comp, elems[index]) if index < len(elems) else None


def _loop_trip_count(comps: dict[str, Computation], ins: Instruction, parent: str) -> Optional[int]:
  """Trip count of a while instruction: XLA's own annotation when present, else from its condition."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.rest)
  if known:
    return int(known.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", ins.rest)
  body = re.search(r"body=%?([\w.\-]+)", ins.rest)
  if not cond or not body:
    return None
  operands = _operands(ins.rest)
  return trip_count(comps, cond.group(1), body.group(1), comps.get(parent),
                    operands[0] if operands else None)


@dataclasses.dataclass
class FlopCount:
  flops: float
  loops: list[tuple[str, Optional[int]]]  # (body name, trip count or None when unknown)

  @property
  def exact(self) -> bool:
    return all(n is not None for _, n in self.loops)


def matmul_flops(hlo_text: str) -> FlopCount:
  """Matmul FLOPs of the whole program, with loop bodies multiplied by their trip counts.

  Loops whose trip count cannot be read count once (as XLA does) and are listed in `loops` with None.
  """
  comps = parse(hlo_text)
  loops: list[tuple[str, Optional[int]]] = []
  memo: dict[str, float] = {}

  def total(name: str, stack: tuple[str, ...]) -> float:
    if name in memo:
      return memo[name]
    comp = comps.get(name)
    if comp is None or name in stack:
      return 0.0
    flops = 0.0
    for ins in comp.instructions:
      flops += _instruction_flops(comp, ins)
      if ins.opcode == "while":
        body = re.search(r"body=%?([\w.\-]+)", ins.rest)
        n = _loop_trip_count(comps, ins, name)
        loops.append((body.group(1) if body else "?", n))
        if body:
          flops += (n if n is not None else 1) * total(body.group(1), stack + (name,))
      elif ins.opcode in ("fusion", "async-start"):
        callee = re.search(r"calls=%?([\w.\-]+)", ins.rest)
        if callee:
          flops += total(callee.group(1), stack + (name,))
      elif ins.opcode == "call":
        callee = re.search(r"to_apply=%?([\w.\-]+)", ins.rest)
        if callee:
          flops += total(callee.group(1), stack + (name,))
      elif ins.opcode == "conditional":
        # One branch runs; count the most expensive one (an upper bound).
        branches = re.search(r"branch_computations=\{([^}]*)\}", ins.rest)
        if branches:
          flops += max(total(b.strip().lstrip("%"), stack + (name,)) for b in branches.group(1).split(","))
    memo[name] = flops
    return flops

  entry = [c.name for c in comps.values() if c.is_entry]
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")
  return FlopCount(total(entry[0], ()), loops)


def reachable(comps: dict[str, Computation], root: str) -> set[str]:
  """Names of `root` and every computation it calls, transitively."""
  seen, todo = set(), [root]
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for ins in comps[name].instructions:
      for m in _CALLEE.finditer(ins.rest):
        todo.extend(c.lstrip("%") for c in re.split(r",\s*", m.group(2)))
  return seen


def collectives(comps: dict[str, Computation], names: set[str]) -> list[str]:
  """Collective instructions (sync or async) in the given computations, as 'computation: opcode'."""
  found = []
  for name in sorted(names):
    for ins in comps[name].instructions:
      base = ins.opcode.removesuffix("-start").removesuffix("-done")
      if base in COLLECTIVES:
        found.append(f"{name}: {ins.opcode}")
  return found


def while_loops(hlo_text: str) -> list[dict]:
  """Every while loop: body name, trip count, and the collectives anywhere inside its body."""
  comps = parse(hlo_text)
  out = []
  for comp in comps.values():
    for ins in comp.instructions:
      if ins.opcode != "while":
        continue
      body = re.search(r"body=%?([\w.\-]+)", ins.rest).group(1)
      inside = reachable(comps, body)
      out.append(dict(body=body, parent=comp.name, trip_count=_loop_trip_count(comps, ins, comp.name),
                      collectives=collectives(comps, inside),
                      nested_loops=sum(1 for c in inside for i in comps[c].instructions
                                       if i.opcode == "while"),
                      op_names=sorted({m.group(1) for c in inside for i in comps[c].instructions
                                       for m in [re.search(r'op_name="([^"]+)"', i.rest)] if m})))
  return out


# ---------------------------------------------------------------------------------------------------
# Bytes: HBM traffic and collectives, per device, loop trip counts applied (the step-time model's
# inputs; docs/sharding.md, "Step-time model").

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1}
_ARRAY_ANY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
# Instructions that move no data of their own (views, tuples, control flow whose bodies are counted).
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call",
               "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
               "copy-done", "send-done", "recv-done", "async-done"}
_SLICING = ("dynamic-slice", "slice", "gather")


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape (arrays in a tuple summed; layouts and tiling ignored)."""
  return float(sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
                   for dt, dims in _ARRAY_ANY.findall(shape.split("{")[0] if not shape.startswith("(")
                                                      else re.sub(r"\{[^}]*\}", "", shape))))


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective as executed on one device: kind, payload bytes, group size, slices spanned."""

  kind: str  # all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute, ...
  nbytes: float  # all-gather: the gathered result; reduce-scatter: the input; others: the result
  group_size: int
  num_slices: int  # distinct DCN slices in one group (1: ICI only)
  count: float  # executions per step (loop trip counts applied)
  name: str


def replica_groups(rest: str, num_devices: int) -> list[list[int]]:
  """The device groups of a collective's attributes, in any of the forms XLA prints."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
  if mesh:
    axes = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    grouped = [names.index(a) for a in re.findall(r"'([^']+)'", mesh.group(2))]
    ids = np.arange(math.prod(sizes)).reshape(sizes)
    order = [i for i in range(len(sizes)) if i not in grouped] + grouped
    n = math.prod(sizes[i] for i in grouped)
    return ids.transpose(order).reshape(-1, n).tolist()
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rest)
  if iota:
    shape = [int(s) for s in iota.group(1).split(",")]
    ids = np.arange(math.prod(shape)).reshape([int(s) for s in iota.group(2).split(",")])
    if iota.group(3):
      ids = ids.transpose([int(s) for s in iota.group(3).split(",")])
    return ids.reshape(shape[0], -1).tolist()
  explicit = re.search(r"replica_groups=\{(\{[\d,\s]*\}(?:,\s*\{[\d,\s]*\})*)?\}", rest)
  if explicit and explicit.group(1):
    return [[int(i) for i in g.split(",") if i.strip()] for g in re.findall(r"\{([\d,\s]*)\}", explicit.group(1))]
  pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", rest)
  if pairs:
    return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", pairs.group(1) + "}")]
  return [list(range(num_devices))]


def _collective(ins: Instruction, comp: Computation, num_devices: int, num_slices: int,
                as_reduce_scatter: bool, count: float) -> Optional[Collective]:
  megascale = re.search(r'_xla_megascale_transfer_type="(\w+)"', ins.rest)
  if ins.opcode == "send" and megascale:
    # Multi-slice programs are compiled per slice; the DCN part of a collective is a host-transfer
    # send/recv pair handled by the megascale runtime, across all slices.
    payload = _ARRAY_ANY.search(ins.shape)
    nbytes = shape_bytes(payload.group(0)) if payload else 0.0
    return Collective(megascale.group(1).lower().replace("_", "-"), nbytes, num_slices, num_slices, count,
                      ins.name)
  kind = ins.opcode.removesuffix("-start")
  if kind not in COLLECTIVES:
    return None
  groups = replica_groups(ins.rest, num_devices)
  per_slice = max(num_devices // num_slices, 1)
  spans = max(len({d // per_slice for d in g}) for g in groups)
  if kind == "collective-permute":
    n = 2
  else:
    n = max(len(g) for g in groups)
  if ins.opcode.endswith("-start") and ins.shape.startswith("("):
    # Async starts return (operands, results[, context]): the payload is the largest member.
    nbytes = max((shape_bytes(f"{dt}[{dims}]") for dt, dims in _ARRAY_ANY.findall(ins.shape)), default=0.0)
  else:
    nbytes = shape_bytes(ins.shape)
  if kind == "reduce-scatter":
    nbytes *= n  # the printed result is the scattered shard
  if kind == "all-reduce" and as_reduce_scatter:
    kind = "reduce-scatter"  # TPU XLA writes reduce-scatter as all-reduce + dynamic-slice in a fusion
  return Collective(kind, nbytes, n, spans, count, ins.name)


@dataclasses.dataclass
class Traffic:
  """Per-device bytes of one program, loop trip counts applied."""

  hbm_bytes: float  # read + written by every top-level instruction (fusions as units)
  collectives: list[Collective]
  exact: bool  # False when some loop's trip count was unknown (counted once)


def _fusion_bytes(comps: dict[str, Computation], callee: Optional[str], ins: Instruction,
                  shapes: dict[str, str]) -> float:
  """Bytes a fusion reads and writes, counting sliced operands by their slices and in-place updates
  by the update (the way XLA's own cost analysis does)."""
  ops = _operands(ins.rest)
  inner = comps.get(callee) if callee else None
  if inner is None:
    return shape_bytes(ins.shape) + sum(shape_bytes(shapes.get(o, "")) for o in ops)
  params: dict[int, str] = {}
  users: dict[str, list[Instruction]] = {}
  for i in inner.instructions:
    if i.opcode == "parameter":
      m = re.match(r"\s*(\d+)\)", i.rest)
      if m:
        params[int(m.group(1))] = i.name
    for o in _operands(i.rest):
      users.setdefault(o, []).append(i)
  by_name = {i.name: i for i in inner.instructions}

  def through_bitcasts(name: str) -> Optional[Instruction]:
    i = by_name.get(name)
    while i is not None and i.opcode in ("bitcast", "copy") and _operands(i.rest):
      i = by_name.get(_operands(i.rest)[0])
    return i

  root = next((i for i in inner.instructions if i.is_root), None)
  outputs = ([by_name.get(o) for o in _operands(root.rest)] if root is not None and root.opcode == "tuple"
             else [root])
  in_place: set[str] = set()
  out = 0.0
  for o in outputs:
    if o is None:
      continue
    dus = through_bitcasts(o.name)
    if dus is not None and dus.opcode == "dynamic-update-slice":
      # Updated in place: only the update is written (and read), not the whole buffer.
      dus_ops = _operands(dus.rest)
      buffer = through_bitcasts(dus_ops[0]) if dus_ops else None
      if buffer is not None and buffer.opcode == "parameter":
        in_place.add(buffer.name)
      update = by_name.get(dus_ops[1]) if len(dus_ops) > 1 else None
      out += 2 * shape_bytes(update.shape) if update is not None else shape_bytes(o.shape)
    else:
      out += shape_bytes(o.shape)
  total = out
  for index, op in enumerate(ops):
    pname = params.get(index)
    if pname is None:
      total += shape_bytes(shapes.get(op, ""))
      continue
    if pname in in_place:
      continue
    uses = users.get(pname, [])
    if uses and all(u.opcode in _SLICING for u in uses):
      total += sum(shape_bytes(u.shape) for u in uses)
    else:
      total += shape_bytes(shapes.get(op, ""))
  return total


def traffic(hlo_text: str, num_devices: int, num_slices: int = 1) -> Traffic:
  """HBM bytes and collectives of one device's program (SPMD: every device runs the same one).

  HBM bytes count each top-level instruction's operands and result once (a fusion is one unit; its
  intermediates stay on chip), with loops multiplied by their trip counts. Collectives are listed with
  their execution counts; a group spans more than one slice when its device ids fall in different
  blocks of `num_devices / num_slices` (the `slice` mesh axis is the outermost). The TPU compiler
  writes a multi-slice program per slice: its DCN transfers are megascale send ops, listed as
  collectives over `num_slices` slices.
  """
  comps = parse(hlo_text)
  found: list[Collective] = []
  exact = True

  def walk(name: str, count: float, stack: tuple[str, ...], rs: bool = False) -> float:
    nonlocal exact
    comp = comps.get(name)
    if comp is None or name in stack:
      return 0.0
    shapes = {i.name: i.shape for i in comp.instructions}
    nbytes = 0.0
    for ins in comp.instructions:
      c = _collective(ins, comp, num_devices, num_slices, rs, count)
      if c is not None:
        found.append(c)
      callee = re.search(r"calls=%?([\w.\-]+)", ins.rest)
      if ins.opcode == "while":
        body = re.search(r"body=%?([\w.\-]+)", ins.rest)
        n = _loop_trip_count(comps, ins, name)
        exact = exact and n is not None
        if body:
          nbytes += (n or 1) * walk(body.group(1), count * (n or 1), stack + (name,))
      elif ins.opcode == "call":
        to_apply = re.search(r"to_apply=%?([\w.\-]+)", ins.rest)
        if to_apply:
          nbytes += walk(to_apply.group(1), count, stack + (name,))
      elif ins.opcode == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", ins.rest)
        if branches:
          names = [b.strip().lstrip("%") for b in branches.group(1).split(",")]
          nbytes += walk(names[0], count, stack + (name,))
      elif ins.opcode == "fusion":
        if callee and callee.group(1).startswith("all-reduce-scatter"):
          walk(callee.group(1), count, stack + (name,), rs=True)  # the collective inside
        nbytes += _fusion_bytes(comps, callee.group(1) if callee else None, ins, shapes)
      elif ins.opcode == "async-start":
        if callee:
          walk(callee.group(1), count, stack + (name,), rs=callee.group(1).startswith("all-reduce-scatter"))
      elif ins.opcode in ("dynamic-slice", "slice", "gather"):
        nbytes += 2 * shape_bytes(ins.shape)
      elif ins.opcode == "copy-start":
        ops = _operands(ins.rest)
        nbytes += 2 * shape_bytes(shapes.get(ops[0], "")) if ops else 0.0
      elif ins.opcode == "dynamic-update-slice":
        ops = _operands(ins.rest)
        nbytes += 2 * shape_bytes(shapes.get(ops[1], "")) if len(ops) > 1 else 0.0
      elif ins.opcode not in _NO_TRAFFIC and not ins.opcode.endswith("-done"):
        nbytes += shape_bytes(ins.shape) + sum(shape_bytes(shapes.get(o, "")) for o in _operands(ins.rest))
    return nbytes

  entry = [c.name for c in comps.values() if c.is_entry]
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")
  hbm = walk(entry[0], 1.0, ())
  return Traffic(hbm, found, exact)
