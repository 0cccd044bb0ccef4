"""What a run will cost before it is submitted: chips x predicted step time x steps, and the price.

The step time is the planner's prediction for the compiled program (`launch/preflight.py`'s fit check,
`sharding/planner.py`'s step-time model). Prices come only from a table the user supplies
(`--prices=FILE`, YAML or JSON; docs/launch.md, "Cost"); this module holds no price of its own, and
a table without the target's chip and capacity kind is an error, never a zero:

    currency: USD
    date: 2026-12-01          # when the figures were read
    source: https://...       # where they were read
    prices:                   # per chip-hour, by chip generation and capacity kind
      v5p: {on-demand: 4.20, spot: 2.10, reserved: 2.90}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from launch import spec as spec_lib
from sharding import chips as chips_lib

_FIELDS = ("currency", "date", "source", "prices")


@dataclasses.dataclass(frozen=True)
class PriceTable:
  """A user's price table: (generation, capacity kind) -> price per chip-hour."""

  path: str
  currency: str
  date: str
  source: str
  prices: dict[tuple[str, str], float]

  def price(self, generation: str, capacity: str) -> float:
    """Price per chip-hour; ValueError (naming the file and what it has) when the table lacks it."""
    key = (generation, capacity)
    if key not in self.prices:
      have = ", ".join(f"{g} {c}" for g, c in sorted(self.prices)) or "nothing"
      raise ValueError(f"the price table {self.path} has no price for {generation} {capacity} "
                       f"(it has: {have}); add prices.{generation}.{capacity}")
    return self.prices[key]

  def describe(self) -> str:
    return f"{self.currency}, prices of {self.date} from {self.source} ({self.path})"


def _parse(path: str, text: str) -> Any:
  if path.endswith(".json"):
    return json.loads(text)
  import yaml  # pylint: disable=g-import-not-at-top
  return yaml.safe_load(text)


def load(path: str) -> PriceTable:
  """Reads and checks a price table (YAML, or JSON for a `.json` file).

  Raises:
    ValueError: unreadable, a missing or unknown field, an unknown generation or capacity kind, or a
      price that is not a positive number; the message names the file and the field.
  """
  try:
    with open(os.path.expanduser(path)) as f:
      data = _parse(path, f.read())
  except OSError as e:
    raise ValueError(f"cannot read the price table {path}: {e.strerror}") from e
  except ValueError as e:  # json.JSONDecodeError
    raise ValueError(f"the price table {path} is not valid JSON: {e}") from e
  except Exception as e:  # yaml.YAMLError and its subclasses
    raise ValueError(f"the price table {path} is not valid YAML: {str(e).splitlines()[0]}") from e
  if not isinstance(data, dict):
    raise ValueError(f"the price table {path} must be a mapping with fields {', '.join(_FIELDS)}")
  unknown = sorted(set(data) - set(_FIELDS) - {"note"})
  missing = [k for k in _FIELDS if k not in data]
  if unknown or missing:
    raise ValueError(f"the price table {path}: " + "; ".join(
        ([f"unknown field(s) {', '.join(unknown)}"] if unknown else [])
        + ([f"missing field(s) {', '.join(missing)}"] if missing else []))
        + f" (fields: {', '.join(_FIELDS)}, note)")
  for k in ("currency", "date", "source"):
    if not str(data[k]).strip():
      raise ValueError(f"the price table {path}: {k} is empty; say where and when the figures come from")
  if not isinstance(data["prices"], dict):
    raise ValueError(f"the price table {path}: prices must map a chip generation to "
                     "{capacity kind: price per chip-hour}")
  prices = {}
  for gen, by_capacity in data["prices"].items():
    if gen not in chips_lib.CHIPS:
      raise ValueError(f"the price table {path}: prices.{gen} is not a chip generation "
                       f"(known: {', '.join(chips_lib.CHIPS)})")
    if not isinstance(by_capacity, dict):
      raise ValueError(f"the price table {path}: prices.{gen} must map a capacity kind "
                       f"({', '.join(spec_lib.CAPACITIES)}) to a price per chip-hour")
    for capacity, value in by_capacity.items():
      if capacity not in spec_lib.CAPACITIES:
        raise ValueError(f"the price table {path}: prices.{gen}.{capacity} is not a capacity kind "
                         f"(known: {', '.join(spec_lib.CAPACITIES)})")
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
          or not math.isfinite(value):
        raise ValueError(f"the price table {path}: prices.{gen}.{capacity}={value!r} must be a "
                         "positive number (price per chip-hour)")
      prices[(gen, capacity)] = float(value)
  return PriceTable(path=path, currency=str(data["currency"]), date=str(data["date"]),
                    source=str(data["source"]), prices=prices)


@dataclasses.dataclass(frozen=True)
class RunCost:
  """One run's chip time, and its price when a table was given."""

  chips: int  # all slices
  step_s: float  # the planner's predicted step time
  steps: int
  price: float | None = None  # per chip-hour
  currency: str = ""

  @property
  def duration_s(self) -> float:
    return self.step_s * self.steps

  @property
  def chip_hours(self) -> float:
    return self.chips * self.step_s * self.steps / 3600.0

  @property
  def cost(self) -> float | None:
    return None if self.price is None else self.chip_hours * self.price


def estimate(target: spec_lib.Target, num_slices: int, capacity: str, step_s: float, steps: int,
             prices: PriceTable | None) -> RunCost:
  """The run's chip-hours and (with a table) cost; ValueError when the table lacks the target."""
  price = prices.price(target.generation, capacity) if prices is not None else None
  return RunCost(chips=target.chips * num_slices, step_s=step_s, steps=steps, price=price,
                 currency=prices.currency if prices is not None else "")


def duration(seconds: float) -> str:
  """`3d 4h`, `5h 12m`, `7m 03s`, `12.5s`."""
  if seconds < 60:
    return f"{seconds:.1f}s"
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  d, h = divmod(h, 24)
  if d:
    return f"{d}d {h}h"
  return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


def hours(h: float) -> str:
  """Chip-hours for people: `24,211`, `12.50`, `0.0003314`."""
  return f"{h:,.0f}" if h >= 100 else f"{h:,.2f}" if h >= 1 else f"{h:.4g}"


def money(amount: float, currency: str) -> str:
  return f"{amount:,.2f} {currency}"


def formula(c: RunCost) -> str:
  """`256 chips x 4.760 s x 1000 steps = 338.5 chip-hours x 4.20 USD = 1,421.56 USD`."""
  text = f"{c.chips} chips x {c.step_s:.4g} s x {c.steps} steps = {hours(c.chip_hours)} chip-hours"
  if c.price is not None:
    text += f" x {c.price:g} {c.currency} = {money(c.cost, c.currency)}"
  return text


def plan_rows(spec: spec_lib.JobSpec, steps: int | None, step_s: float | None,
              prices: PriceTable | None) -> list[tuple[str, str]]:
  """The dry run's opening summary: slices, chips, hosts, predicted step time, steps, duration,
  chip-hours, cost (what is unknown says why)."""
  rows = []
  t = spec.target
  if t is None:
    rows.append(("slices", f"none: {spec.num_processes} local process(es) on this machine"))
  else:
    rows += [("slices", f"{spec.num_slices} x {t.accelerator_type} ({t.topology_name})"),
             ("chips", f"{t.chips * spec.num_slices} ({t.chips} per slice)"),
             ("hosts", f"{spec.num_hosts} ({t.hosts} per slice, {t.chips_per_host} chips each)")]
  rows.append(("steps", str(steps) if steps is not None else "unknown (the config did not load)"))
  if t is None or step_s is None:
    why = ("no TPU target" if t is None else "no fit check (--skip_fit_check)" if step_s is None
           else "")
    rows.append(("step time", f"not predicted: {why}"))
    if prices is not None:
      rows.append(("cost", f"not estimated: {why}"))
    return rows
  c = estimate(t, spec.num_slices, spec.capacity, step_s, steps or 0, prices)
  rows += [("step time", f"{step_s:.4g} s predicted (the planner's step-time model on the compiled "
                         "program; not yet checked against a real TPU)"),
           ("duration", f"{duration(c.duration_s)} of training (queueing, start-up and compile "
                        "not included)"),
           ("chip-hours", formula(dataclasses.replace(c, price=None)))]
  if prices is None:
    rows.append(("cost", "pass --prices=FILE (docs/launch.md, \"Cost\")"))
  else:
    rows.append(("cost", f"{money(c.cost, c.currency)} = {hours(c.chip_hours)} chip-hours x "
                         f"{c.price:g} {c.currency} ({t.generation} {spec.capacity}; "
                         f"{prices.describe()})"))
  return rows


@dataclasses.dataclass(frozen=True)
class ComputeCost:
  """A training budget in FLOPs on a target at an assumed MFU, and its price (for `fit`)."""

  flops: float
  target: spec_lib.Target
  num_slices: int
  mfu: float
  price: float | None = None
  currency: str = ""

  @property
  def chip_hours(self) -> float:
    chip = chips_lib.CHIPS[self.target.generation]
    return self.flops / (chip.peak_bf16_flops * self.mfu) / 3600.0

  @property
  def duration_s(self) -> float:
    return self.chip_hours * 3600.0 / (self.target.chips * self.num_slices)

  @property
  def cost(self) -> float | None:
    return None if self.price is None else self.chip_hours * self.price


def compute_cost(flops: float, target: spec_lib.Target, num_slices: int, capacity: str, mfu: float,
                 prices: PriceTable) -> ComputeCost:
  """`flops` of training at `mfu` of the target chip's bf16 peak; ValueError on a bad MFU or a
  table without the target."""
  if not 0 < mfu <= 1:
    raise ValueError(f"--mfu={mfu} must be in (0, 1]: the fraction of the chip's bf16 peak the run "
                     "achieves (the fit check's report gives the planner's MFU for a config)")
  return ComputeCost(flops, target, num_slices, mfu, prices.price(target.generation, capacity),
                     prices.currency)


def format_compute(c: ComputeCost) -> str:
  """`1.2e+21 FLOPs / (459 TFLOP/s x MFU 40%) = 1,815 chip-hours x 4 USD = 7,262.00 USD; 14h 11m on
  2 x v5p-128`."""
  chip = chips_lib.CHIPS[c.target.generation]
  return (f"{c.flops:.3g} FLOPs / ({chip.peak_bf16_flops / 1e12:g} TFLOP/s x MFU {c.mfu:.0%}) = "
          f"{hours(c.chip_hours)} chip-hours x {c.price:g} {c.currency} = {money(c.cost, c.currency)}; "
          f"{duration(c.duration_s)} on {c.num_slices} x {c.target.accelerator_type}")
