"""Config specs to files: the presets of the installed `configs` package, and their named points.

`--config=SPEC` (and `experiment.load_config(SPEC)`) takes a path `PATH[:ARG]` or a preset:

* a config file of the installed `configs` package by name: `tiny`, `tiny.py`, `configs/tiny.py`,
  `configs:tiny`, `ladder:griffin,1b` (`:ARG` goes to `get_config(ARG)`);
* a named point of a parameterised preset, generated here rather than kept as a file of its own:
  `griffin_1b` (also `configs/griffin_1b.py`) is `configs/ladder.py:griffin,1b` for every family and
  size of the Griffin paper's ladder, `recurrentgemma_2b` is `configs/recurrentgemma.py:2b`.

A file that exists relative to the working directory always wins. This module imports nothing heavy
(no jax), so command-line tools resolve names before anything slow starts.
"""

from __future__ import annotations

import importlib.util
import os
import re

# Modules of `configs` that are not experiments themselves.
_HELPERS = ("base", "recipe")


def preset_dir() -> str | None:
  """Directory of the installed `configs` package (presets), found without importing it."""
  spec = importlib.util.find_spec("configs")
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


def named_points() -> dict[str, str]:
  """`griffin_1b` -> `ladder.py:griffin,1b`, ...: the presets that are points of a parameterised file.

  Generated from `configs/ladder.py` (families x sizes) and `configs/recurrentgemma.py` (sizes); both
  import only ml_collections.
  """
  if preset_dir() is None:
    return {}
  from configs import ladder  # pylint: disable=g-import-not-at-top
  from configs import recurrentgemma  # pylint: disable=g-import-not-at-top
  points = {f"{family}_{size}": f"ladder.py:{family},{size}"
            for family in ladder.FAMILIES for size in ladder.LADDER}
  points.update({f"recurrentgemma_{size}": f"recurrentgemma.py:{size}" for size in recurrentgemma.SIZES})
  return points


def names() -> list[str]:
  """Every preset name `--config` accepts: config files of `configs/` and their named points."""
  directory = preset_dir()
  if directory is None:
    return []
  files = [f[:-3] for f in os.listdir(directory)
           if f.endswith(".py") and not f.startswith("_") and f[:-3] not in _HELPERS]
  return sorted(set(files) | set(named_points()))


def resolve(spec: str) -> str:
  """A config spec as a file path `PATH[:ARG]`: PATH if it exists, else an installed preset.

  Anything that names no preset is returned unchanged (loading it then reports the missing file).
  """
  for prefix in ("configs:", "recurrentgemma_tpu:"):
    if spec.startswith(prefix):
      spec = spec[len(prefix):]
  path, sep, arg = spec.partition(":")
  if os.path.isfile(path):
    return spec
  m = re.fullmatch(r"(?:configs/)?(\w+)(?:\.py)?", path)
  directory = preset_dir()
  if m is None or directory is None:
    return spec
  candidate = os.path.join(directory, m.group(1) + ".py")
  if os.path.isfile(candidate):
    return candidate + sep + arg
  point = named_points().get(m.group(1))
  if point is not None and not sep:
    return os.path.join(directory, point)
  return spec


def problem(spec: str) -> str | None:
  """Why the config file `spec` names is not a config file, or None (used when loading it failed).

  Catches what ml_collections reports confusingly: no `get_config` ("'module' has no attribute"),
  and a `get_config` that returns None (a forgotten `return`).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  path, sep, arg = resolve(spec).partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_config_file_check", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  except Exception:  # pylint: disable=broad-except
    return None  # not readable or raises on import: the loader's own message says so
  if not callable(getattr(module, "get_config", None)):
    return f"{path} defines no get_config() (a config file defines get_config() returning a ConfigDict)"
  try:
    config = module.get_config(*([arg] if sep else []))
  except Exception:  # pylint: disable=broad-except
    return None
  if not isinstance(config, ml_collections.ConfigDict):
    return (f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict "
            "(a forgotten `return config`?)")
  return None

