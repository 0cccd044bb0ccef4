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
