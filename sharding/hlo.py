"""Reading compiled (post-optimisation) HLO text: matmul FLOPs with loop trip counts, and collectives.

Why not `compiled.cost_analysis()["flops"]` alone: XLA's cost analysis counts the body of a `while`
loop once, whatever its trip count, so a model whose layers run under `lax.scan` (or a step that
accumulates micro-batches in a loop) is under-counted by the number of iterations. Here every
computation's dot / convolution FLOPs are counted and multiplied along the call graph by the trip
count of each enclosing loop, read from the loop condition (`counter < constant`, the form `lax.scan`
and `fori_loop` produce; the counter starts at 0). Only matrix products are counted, which is also
what 6 x params x tokens counts.
"""

import dataclasses
import math
import re
from typing import Optional

_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
               "collective-broadcast", "ragged-all-to-all")


@dataclasses.dataclass
class Instruction:
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
      current.instructions.append(Instruction(m.group(2), m.group(3), m.group(4), m.group(5)))
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
    kernel = comp.shape_of(ops[1]) if len(ops) > 1 else None
    labels = re.search(r"dim_labels=\w*_(\w+)->", ins.rest)
    if kernel is None or labels is None or "o" not in labels.group(1):
      return 0.0
    # Each output element takes (kernel elements / output features) multiply-adds; this holds for
    # feature- and batch-grouped convolutions too, which is how TPU XLA writes batched matmuls.
    o = kernel[labels.group(1).index("o")]
    return 2.0 * math.prod(out) * math.prod(kernel) / max(o, 1)
  return 0.0


def trip_count(comps: dict[str, Computation], condition: str) -> Optional[int]:
  """Trip count of a loop whose condition is `counter < constant` with the counter from 0."""
  comp = comps.get(condition)
  if comp is None:
    return None
  consts = {}
  for ins in comp.instructions:
    if ins.opcode == "constant":
      m = re.match(r"\s*(-?\d+)\)", ins.rest)
      if m:
        consts[ins.name] = int(m.group(1))
  for ins in comp.instructions:
    if ins.opcode == "compare" and "direction=LT" in ins.rest:
      ops = _operands(ins.rest)
      if len(ops) == 2 and ops[1] in consts:
        return consts[ops[1]]
  return None


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
        cond = re.search(r"condition=%?([\w.\-]+)", ins.rest)
        n = trip_count(comps, cond.group(1)) if cond else None
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
      cond = re.search(r"condition=%?([\w.\-]+)", ins.rest).group(1)
      inside = reachable(comps, body)
      out.append(dict(body=body, parent=comp.name, trip_count=trip_count(comps, cond),
                      collectives=collectives(comps, inside),
                      nested_loops=sum(1 for c in inside for i in comps[c].instructions
                                       if i.opcode == "while"),
                      op_names=sorted({m.group(1) for c in inside for i in comps[c].instructions
                                       for m in [re.search(r'op_name="([^"]+)"', i.rest)] if m})))
  return out
