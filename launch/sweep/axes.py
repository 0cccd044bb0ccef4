"""Axis combinators of sweep definitions: each returns a list of points (dicts of settings).

A point maps names to values. A name with a dot is a config override (`optimizer.learning_rate`);
a name without one is a sweep variable (`family`, `size`, `tokens`, `budget`) that the definition
turns into overrides (see `definition.py`).

    product(sweep("family", ["griffin", "hawk"]), sweep("size", ["s", "m"]))   # 4 points
    zip_(sweep("size", ["s", "m"]), sweep("optimizer.learning_rate", [3e-3, 2e-3]))  # 2 points
    chain(product(...), fixed(family="griffin", size="14b"))   # the points of each, in order
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Mapping, Sequence

Point = dict[str, Any]


def sweep(name: str, values: Iterable[Any]) -> list[Point]:
  """One point per value of one setting."""
  values = list(values)
  if not values:
    raise ValueError(f"sweep({name!r}, ...) needs at least one value")
  return [{name: v} for v in values]


def fixed(**settings: Any) -> list[Point]:
  """A single point."""
  return [dict(settings)]


def _merge(points: Sequence[Mapping[str, Any]]) -> Point:
  merged: Point = {}
  for p in points:
    clash = sorted(k for k in p if k in merged and merged[k] != p[k])
    if clash:
      raise ValueError(f"axes set {clash} twice with different values: {merged} and {dict(p)}")
    merged.update(p)
  return merged


def product(*axes: Sequence[Mapping[str, Any]]) -> list[Point]:
  """Every combination of one point from each axis (the first axis varies slowest)."""
  return [_merge(combo) for combo in itertools.product(*axes)]


def zip_(*axes: Sequence[Mapping[str, Any]]) -> list[Point]:
  """The i-th points of all axes merged; the axes must have equal lengths."""
  lengths = [len(a) for a in axes]
  if len(set(lengths)) > 1:
    raise ValueError(f"zip_ needs axes of equal length, got {lengths}")
  return [_merge(combo) for combo in zip(*axes)]


def chain(*axes: Sequence[Mapping[str, Any]]) -> list[Point]:
  """The points of each axis one after the other."""
  return [dict(p) for axis in axes for p in axis]
