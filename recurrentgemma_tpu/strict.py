"""The one strict converter from a config group to its frozen dataclass (used by `experiment.build`).

A leaf module (no imports from this package) so the typed configs themselves, e.g.
`ModelConfig.from_config`, can use it too.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Iterable, Mapping


def check_known(name: str, known: Iterable[str], where: str) -> None:
  """Raises ValueError if `name` is not in `known`, naming the nearest known field."""
  known = sorted(known)
  if name not in known:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {where}.{close[0]}?)" if close else ""
    raise ValueError(f"{where}.{name} is not a field of {where}{hint}. Known fields: {known}.")


_SCALARS = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}


def _check_type(value: Any, hint: Any, where: str) -> Any:
  """Checks a scalar against its annotation; int widens to float. Other types pass unchanged."""
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint in _SCALARS:
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if not ok:
      raise ValueError(f"{where}={value!r} must be {_SCALARS[hint]}.")
    if hint is float and not math.isfinite(value):
      raise ValueError(f"{where}={value!r} must be a finite number.")
  return value


def typed(cls: type, group: Mapping[str, Any], where: str, *, exclude: Iterable[str] = (),
          extra: Mapping[str, Any] | None = None) -> Any:
  """Builds the frozen dataclass `cls` from a config group, strictly.

  Args:
    cls: the dataclass (its `__post_init__` checks the values).
    group: a ConfigDict group (or mapping) holding exactly `cls`'s fields, plus `exclude`.
    where: the group's name in messages, e.g. "config.mesh".
    exclude: fields of the group that are not fields of `cls` (read elsewhere).
    extra: values of fields of `cls` that do not come from the group.

  Raises:
    ValueError: an unknown field (with the nearest known name), a missing field, or a value of the
      wrong type, each naming the field.
  """
  extra = dict(extra or {})
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls) if f.name not in extra]
  excluded = set(exclude)
  items = {k: v for k, v in group.items() if k not in excluded}
  for key in items:
    check_known(key, names, where)
  missing = [n for n in names if n not in items]
  if missing:
    raise ValueError(f"{where} lacks field(s) {missing}; declare them in configs/base.py.")
  values = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in items.items()}
  return cls(**values, **extra)
