"""Sweep definitions (`configs/sweeps/NAME.py`, `get_sweep()`) and their expansion into trials.

A definition is a ConfigDict:

    name       short name of the sweep
    base       config spec of every trial; may name sweep variables: "configs/ladder.py:{family},{size}"
    choices    {variable: {value: overrides}}: overrides a variable's value stands for (nested dicts
               such as {"model": {"width": 64}} or a tuple of "group.field=value" strings)
    overrides  overrides of every trial (same forms as a choice)
    axes       list of points built with `launch.sweep.axes` (product / zip_ / chain / sweep / fixed)
    tokens     rule: "config" (keep train.steps), "explicit" (a `tokens` variable on every point) or
               "params" (tokens = per_param x parameters, `params` "total" or "non_embedding")
    budgets    isoFLOP budgets C (FLOPs); each point is trained for C / FLOPs-per-token tokens, so the
               sweep's sizes trace one isoFLOP profile per budget (N for each C with FLOPs(N, D) = C)
    schedule   decay_with_steps: cosine length = the trial's steps; warmup_fraction of them
    lr         rule: "config" or "power" (lr = base * (params / ref_params) ** exponent), unless a
               point sets optimizer.learning_rate itself
    targets    pod backends: candidate TPU targets ("v5p-8", "v5p-16", ...); each trial runs on the
               first, by generation then ascending chips, that its AOT compile fits (targets.py)
    metric     the eval metric the fits use ("eval/loss")
    retries    failed attempts re-run before a trial is left "failed"

`load_sweep` turns the ConfigDict into a `Sweep`, a typed, frozen, validated record (unknown
fields and bad values are refused there, naming the field), and nothing else reads the ConfigDict.
A trial is one resolved config, built once into the trainer's `Experiment` at expansion (a trial
the trainer would refuse fails before anything is launched); its id is that Experiment's
fingerprint, so the same definition gives the same ids and a rerun finds its finished trials.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import string
from typing import Any, Iterable, Mapping

import ml_collections

from launch import spec as spec_lib
from recurrentgemma_tpu import exit_codes

ID_LENGTH = 12
TOKEN_RULES = ("config", "explicit", "params")
LR_RULES = ("config", "power")


@dataclasses.dataclass(frozen=True)
class Trial:
  """One training run of a sweep.

  Attributes:
    id: content hash (first ID_LENGTH hex digits of the sha256 of the resolved config's JSON).
    spec: the config spec (`configs/X.py[:ARG]`).
    overrides: "group.field=value" strings; spec + overrides reproduce the resolved config.
    variables: the point's sweep variables (family, size, budget, ...), for tables and plots.
    info: derived numbers: params, non_embedding_params, tokens, steps, flops_per_token, flops,
      learning_rate, seq_len, tokens_per_step.
    config_hash: the full sha256.
  """

  id: str
  spec: str
  overrides: tuple[str, ...]
  variables: dict[str, Any]
  info: dict[str, Any]
  config_hash: str

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self) | {"overrides": list(self.overrides)}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Trial":
    return cls(id=d["id"], spec=d["spec"], overrides=tuple(d["overrides"]),
               variables=dict(d["variables"]), info=dict(d["info"]), config_hash=d["config_hash"])

  @property
  def label(self) -> str:
    """family/size/... for humans."""
    return "/".join(str(v) for k, v in sorted(self.variables.items()))


# ------------------------------------------------------------------------------------ loading


@dataclasses.dataclass(frozen=True)
class Tokens:
  """How many tokens each trial trains on (see the module docstring)."""

  rule: str = "config"
  per_param: float = 0.0
  params: str = "total"  # "total" | "non_embedding"


@dataclasses.dataclass(frozen=True)
class Schedule:
  decay_with_steps: bool = False
  warmup_fraction: float = 0.0


@dataclasses.dataclass(frozen=True)
class LearningRate:
  rule: str = "config"
  base: float = 0.0
  ref_params: float = 1.0
  exponent: float = 0.0


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A validated sweep definition (the fields of the module docstring)."""

  name: str
  base: str
  axes: tuple[dict[str, Any], ...]
  tokens: Tokens
  metric: str
  choices: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  overrides: Any = None
  budgets: tuple[float, ...] = ()
  schedule: Schedule | None = None
  lr: LearningRate | None = None
  targets: tuple[str, ...] = ()
  retries: int = 2


_REQUIRED = ("name", "base", "axes", "tokens", "metric")


def _record(cls, value: Any, where: str):
  """A typed sub-record from a dict / ConfigDict, refusing unknown fields by name."""
  d = dict(value.items()) if hasattr(value, "items") else None
  if d is None:
    raise ValueError(f"{where} must be a dict of {[f.name for f in dataclasses.fields(cls)]}, "
                     f"got {value!r}")
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
  try:
    return cls(**d)
  except TypeError as e:
    raise ValueError(f"{where}: {e}") from e


def to_sweep(s: Any, where: str = "sweep") -> Sweep:
  """The one conversion of a `get_sweep()` ConfigDict into a `Sweep`; fails early, naming the field."""
  if s is None or not hasattr(s, "items"):
    raise ValueError(f"{where}: get_sweep() returned {s!r}, not a ConfigDict")
  d = dict(s.items())
  for field in _REQUIRED:
    if field not in d:
      raise ValueError(f"{where}: the definition has no `{field}`")
  known = {f.name for f in dataclasses.fields(Sweep)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
  tokens = _record(Tokens, d["tokens"], f"{where}: tokens")
  if tokens.rule not in TOKEN_RULES:
    raise ValueError(f"{where}: tokens.rule={tokens.rule!r} must be one of {TOKEN_RULES}")
  if tokens.rule == "params" and tokens.params not in ("total", "non_embedding"):
    raise ValueError(f"{where}: tokens.params must be 'total' or 'non_embedding'")
  lr = _record(LearningRate, d["lr"], f"{where}: lr") if d.get("lr") is not None else None
  if lr is not None and lr.rule not in LR_RULES:
    raise ValueError(f"{where}: lr.rule={lr.rule!r} must be one of {LR_RULES}")
  schedule = (_record(Schedule, d["schedule"], f"{where}: schedule")
              if d.get("schedule") is not None else None)
  axes = tuple(dict(p) for p in d["axes"])
  if not axes:
    raise ValueError(f"{where}: axes is empty")
  targets = tuple(d.get("targets") or ())
  if targets:
    try:
      spec_lib.parse_targets(list(targets))
    except ValueError as e:
      raise ValueError(f"{where}: targets: {e}") from e
  budgets = tuple(d.get("budgets") or ())
  for b in budgets:
    if not isinstance(b, (int, float)) or not b > 0:
      raise ValueError(f"{where}: budgets must be positive FLOP counts, got {b!r}")
  retries = d.get("retries", 2)
  if not isinstance(retries, int) or retries < 0:
    raise ValueError(f"{where}: retries={retries!r} must be an integer >= 0")
  return Sweep(name=str(d["name"]), base=str(d["base"]), axes=axes, tokens=tokens,
               metric=str(d["metric"]), choices=d.get("choices") or {},
               overrides=d.get("overrides"), budgets=tuple(float(b) for b in budgets),
               schedule=schedule, lr=lr, targets=targets, retries=retries)


def load_sweep(path: str) -> Sweep:
  """Runs `get_sweep()` of a sweep file (`path` may end in ":ARG", passed to get_sweep)."""
  file, _, arg = path.partition(":")
  if not os.path.exists(file):
    raise ValueError(f"--sweep={path!r}: no such file (sweeps live in configs/sweeps/)")
  module_spec = importlib.util.spec_from_file_location("_sweep_definition", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{file} has no get_sweep()")
  return to_sweep(module.get_sweep(arg) if arg else module.get_sweep(), where=file)


# ------------------------------------------------------------------------------------ overrides


def flatten_overrides(value: Any, prefix: str = "") -> list[str]:
  """Nested dicts / ConfigDicts or "k=v" strings -> ["group.field=value", ...]."""
  if value is None:
    return []
  if isinstance(value, str):
    return [value]
  if isinstance(value, (list, tuple)):
    return [item for v in value for item in flatten_overrides(v, prefix)]
  if isinstance(value, (Mapping, ml_collections.ConfigDict)):
    out = []
    for k in sorted(value.keys()):
      v = value[k]
      key = f"{prefix}{k}"
      if isinstance(v, (Mapping, ml_collections.ConfigDict)):
        out += flatten_overrides(v, key + ".")
      else:
        out.append(format_override(key, v))
    return out
  raise ValueError(f"overrides must be dicts or 'k=v' strings, got {value!r}")


def format_override(key: str, value: Any) -> str:
  """`key=value` as `--config.key=value` parses it back to the same value."""
  if isinstance(value, float):
    return f"{key}={value!r}"
  return f"{key}={value}"


def _spec_variables(base: str) -> list[str]:
  return [f for _, f, _, _ in string.Formatter().parse(base) if f]


# ------------------------------------------------------------------------------------ expansion


def _param_counts(model_config: Any) -> tuple[int, int]:
  """(total, non-embedding) parameters of a ModelConfig from the project's counter."""
  from recurrentgemma_tpu.model import flops as flops_lib  # pylint: disable=g-import-not-at-top
  total, non_embedding = flops_lib.param_counts(model_config)
  return int(total), int(non_embedding)


def _flops_per_token(model_config: Any, seq_len: int) -> float:
  """Training FLOPs per token from the project's one FLOP model (not 6N)."""
  from recurrentgemma_tpu.model import flops as flops_lib  # pylint: disable=g-import-not-at-top
  return float(flops_lib.training_flops_per_token(model_config, seq_len))


def _model_numbers(config: ml_collections.ConfigDict) -> dict[str, Any]:
  from recurrentgemma_tpu.model import ModelConfig  # pylint: disable=g-import-not-at-top
  model = ModelConfig.from_config(config.model)
  return _numbers(model, config)


def _numbers(model: Any, config: ml_collections.ConfigDict) -> dict[str, Any]:
  total, non_embedding = _param_counts(model)
  seq_len = int(config.data.seq_len)
  return {"params": total, "non_embedding_params": non_embedding, "seq_len": seq_len,
          "tokens_per_step": int(config.data.global_batch_size) * seq_len,
          "flops_per_token": _flops_per_token(model, seq_len)}


def _points(s: Sweep) -> list[dict[str, Any]]:
  points = [dict(p) for p in s.axes]
  budgets = list(s.budgets)
  if budgets:
    points = [p | {"budget": float(b)} for b in budgets for p in points]
  return points


def resolve(s: Sweep, point: Mapping[str, Any]) -> Trial:
  """One point of a definition -> its Trial (config loaded and resolved, numbers derived)."""
  from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=g-import-not-at-top

  variables = {k: v for k, v in point.items() if "." not in k}
  direct = [format_override(k, v) for k, v in sorted(point.items()) if "." in k]
  needed = _spec_variables(s.base)
  missing = [v for v in needed if v not in variables]
  if missing:
    raise ValueError(f"point {dict(point)} lacks {missing}, which base={s.base!r} needs")
  spec = s.base.format(**variables)
  overrides = flatten_overrides(s.overrides)
  choices = s.choices
  for name, value in sorted(variables.items()):
    if name in choices:
      options = choices[name]
      if str(value) not in options:
        raise ValueError(f"{name}={value!r} has no entry in choices.{name} ({sorted(options)})")
      overrides += flatten_overrides(options[str(value)])
  overrides += direct
  try:
    config = experiment_lib.load_config(spec, overrides)
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"trial {dict(point)}: {exit_codes.message(e)}") from e
  info = _model_numbers(config)  # before build: the token rules need the parameter count

  derived: list[str] = []
  rule = s.tokens.rule
  if "budget" in variables:
    tokens = variables["budget"] / info["flops_per_token"]
  elif rule == "explicit":
    if "tokens" not in variables:
      raise ValueError(f"tokens.rule='explicit' but point {dict(point)} sets no `tokens`")
    tokens = float(variables["tokens"])
  elif rule == "params":
    n = info["params"] if s.tokens.params == "total" else info["non_embedding_params"]
    tokens = float(s.tokens.per_param) * n
  else:
    tokens = None
  if tokens is not None and "train.steps" not in point:
    steps = max(1, int(round(tokens / info["tokens_per_step"])))
    derived.append(f"train.steps={steps}")
  schedule = s.schedule
  steps = int(config.train.steps) if not derived else int(derived[0].split("=")[1])
  if schedule is not None and schedule.decay_with_steps:
    if "optimizer.decay_steps" not in point:
      derived.append(f"optimizer.decay_steps={steps}")
    if "optimizer.warmup_steps" not in point:
      derived.append(f"optimizer.warmup_steps={max(1, int(round(schedule.warmup_fraction * steps)))}")
  lr = s.lr
  if lr is not None and lr.rule == "power" and "optimizer.learning_rate" not in point:
    value = float(lr.base) * (info["params"] / float(lr.ref_params)) ** float(lr.exponent)
    derived.append(format_override("optimizer.learning_rate", float(f"{value:.4g}")))
  experiment_lib.apply_overrides(config, derived)
  overrides += derived

  # Every check the trainer makes, once, here: a bad trial stops the sweep before anything runs.
  # The mesh is resolved for the fewest devices it accepts (its -1 axes take any count).
  mesh = config.mesh
  devices = int(mesh.num_slices) * math.prod(
      int(mesh[a]) for a in ("data", "fsdp", "seq", "model") if int(mesh[a]) != -1)
  try:
    exp = experiment_lib.build(config, num_devices=devices)
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"trial {dict(point)}: {exit_codes.message(e)}") from e
  digest = exp.fingerprint()
  info = _numbers(exp.model, config)
  info |= {"steps": int(config.train.steps),
           "tokens": int(config.train.steps) * info["tokens_per_step"],
           "learning_rate": float(config.optimizer.learning_rate)}
  info["flops"] = info["flops_per_token"] * info["tokens"]
  return Trial(id=digest[:ID_LENGTH], spec=spec, overrides=tuple(overrides), variables=variables,
               info=info, config_hash=digest)


def expand(s: Sweep) -> list[Trial]:
  """Every trial of a definition, in definition order; duplicate configs are kept once."""
  trials, seen = [], set()
  for point in _points(s):
    trial = resolve(s, point)
    if trial.id in seen:
      continue
    seen.add(trial.id)
    trials.append(trial)
  return trials


def select(trials: Iterable[Trial], only: str) -> list[Trial]:
  """Trials whose id starts with one of the comma-separated prefixes in `only` ("" = all)."""
  trials = list(trials)
  if not only:
    return trials
  prefixes = [p.strip() for p in only.split(",") if p.strip()]
  chosen = [t for t in trials if any(t.id.startswith(p) for p in prefixes)]
  unknown = [p for p in prefixes if not any(t.id.startswith(p) for t in trials)]
  if unknown:
    raise ValueError(f"--only: no trial id starts with {unknown}; ids: {[t.id for t in trials]}")
  return chosen

