"""An `Experiment`: the one typed, validated form of an experiment config, built in one place.

    config = load_config("configs/ladder.py:griffin,1b", overrides=("train.steps=5",))
    exp = build(config)                        # every check, once; raises ValueError
    trainer.train_and_evaluate(exp, workdir)   # and compile, sample, summary, benchmarks, launch/

`build` turns each group of the ConfigDict (configs/base.py declares every field) into its frozen
dataclass with one strict converter (`strict.typed`): an unknown field is refused by name with the
nearest known one, a value of the wrong type is refused with the field's type. It then checks what no
single group can: the strategy against the mesh, the batch against the mesh and the micro-batches,
the `init_from` path. Everything after `build` reads the typed objects; nothing below this module
reads a ConfigDict.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import math
import os
import sys
from typing import Any, Iterable, Mapping

import jax
import ml_collections
from ml_collections.config_flags import config_flags

from recurrentgemma_tpu import data as data_lib
from recurrentgemma_tpu import model as model_lib
from recurrentgemma_tpu import optimizer as optimizer_lib
from recurrentgemma_tpu import presets
from recurrentgemma_tpu import spikes as spikes_lib
from recurrentgemma_tpu import step_functions
from recurrentgemma_tpu import strict
from recurrentgemma_tpu.checkpoints import hf_bridge
from recurrentgemma_tpu.checkpoints import manager as ckpt_lib
from recurrentgemma_tpu.downstream import config as eval_lib
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib

GROUPS = ("model", "data", "optimizer", "train", "checkpoint", "mesh", "eval", "spikes")
# A schedule that follows the run (optimizer.decay_steps=0) warms up over at most this part of it.
MAX_WARMUP_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Typed `config.train` (see configs/base.py for each field)."""

  steps: int
  seed: int
  log_every: int
  eval_every: int
  peak_flops_per_device: float

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"config.train.steps={self.steps} must be > 0.")
    if self.log_every < 1:
      raise ValueError(f"config.train.log_every={self.log_every} must be > 0.")
    if self.eval_every < 0:
      raise ValueError(f"config.train.eval_every={self.eval_every} must be >= 0 (0: final only).")
    if self.peak_flops_per_device < 0:
      raise ValueError(f"config.train.peak_flops_per_device={self.peak_flops_per_device} must be "
                       ">= 0 (0 = chip table / measured).")


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run needs, typed and validated (build with `build`).

  Attributes:
    model, optimizer, data, mesh, checkpoint, train, eval, spikes: the typed groups.
    init_from: `config.checkpoint.init_from` ("" = none), already checked to exist.
    num_devices: the device count the mesh was resolved for.
    mesh_shape: size of every axis in `sharding.mesh.MESH_AXES` for `num_devices`.
    config: the ConfigDict it was built from (for config.json and checkpoint metadata only).
  """

  model: model_lib.ModelConfig
  optimizer: optimizer_lib.OptimizerConfig
  data: data_lib.DataConfig
  mesh: mesh_lib.MeshConfig
  checkpoint: ckpt_lib.CheckpointOptions
  train: TrainConfig
  eval: eval_lib.EvalConfig
  spikes: spikes_lib.SpikeConfig
  init_from: str
  num_devices: int
  mesh_shape: dict[str, int]
  config: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)

  @property
  def tokens_per_step(self) -> int:
    return self.data.global_batch_size * self.data.seq_len

  @property
  def total_tokens(self) -> int:
    return self.tokens_per_step * self.train.steps

  def to_json(self) -> str:
    """The full config as JSON (what goes into <workdir>/config.json), keys sorted."""
    return self.config.to_json_best_effort(indent=2, sort_keys=True)

  def fingerprint(self) -> str:
    """Hex sha256 of `to_json()`: equal for equal configs, whatever the device count."""
    return hashlib.sha256(self.to_json().encode()).hexdigest()


# ------------------------------------------------------------------------------------ loading


def _parse_value(text: str, current: Any) -> Any:
  """An override's value as `--config.K=V` parses it (a Python literal, else a string)."""
  if isinstance(current, str):
    return text
  literal = text.capitalize() if text in ("true", "false") else text
  try:
    return ast.literal_eval(literal)
  except (SyntaxError, ValueError):
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
  """Applies `group.field=value` overrides (like `--config.group.field=value`) to a config."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} must look like group.field=value")
    *parents, name = key.strip().split(".")
    node, where = config, "config"
    for part in parents:
      strict.check_known(part, node.keys(), where)
      node, where = node[part], f"{where}.{part}"
    strict.check_known(name, node.keys(), where)
    try:
      node[name] = _parse_value(text, node[name])
    except TypeError as e:
      raise ValueError(f"override {item!r}: {e}") from e


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Loads `configs/NAME.py[:ARG]` (ARG goes to `get_config(ARG)`), locks it, applies overrides.

  The same as `--config=SPEC --config.K=V ...` on the command line; a preset's name (`tiny`,
  `ladder:griffin,1b`, `griffin_1b`) names the installed `configs/` file (`presets.resolve`).

  Raises:
    FileNotFoundError: SPEC names no file and no preset.
    ValueError: the file has no get_config(), it returns no ConfigDict, or an override is bad.
  """
  path = presets.resolve(spec)
  if not os.path.isfile(path.partition(":")[0]):
    raise FileNotFoundError(f"config {spec!r}: no such config file or preset (give a path, or a "
                            f"preset: {', '.join(presets.names())})")
  # ml_collections loads the file as module `config_config` with `SourceFileLoader.load_module`, which
  # re-executes it inside an earlier load's module: a file without get_config would silently get the
  # previous file's. Each load starts from a fresh module.
  sys.modules.pop("config_config", None)
  try:
    config = config_flags.ConfigFileFlagParser(name="config", lock_config=True).parse(path)
  except ValueError as e:  # ml_collections wraps get_config's own error in a traceback's text
    cause = e.__context__ if isinstance(e.__context__, ValueError) else e
    raise ValueError(f"config {spec!r}: {' '.join(str(cause).split())}") from cause
  except AttributeError as e:  # "module ... has no attribute 'get_config'", among others
    problem = presets.problem(path)
    if problem:
      raise ValueError(problem) from e
    raise
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(presets.problem(path) or f"config {spec!r}: get_config() returned "
                     f"{type(config).__name__}, not a ConfigDict")
  apply_overrides(config, overrides)
  return config


# ------------------------------------------------------------------------------------ converting


def _check_data_fields(data: Mapping[str, Any]) -> None:
  # Field names only: data.config.data_config_from checks the values (and reads model.vocab_size).
  fields = {f.name for f in dataclasses.fields(data_lib.DataConfig)} - {"vocab_size"}
  for key in data.keys():
    strict.check_known(key, fields, "config.data")
  source_fields = {f.name for f in dataclasses.fields(data_lib.SourceConfig)} - {"name"}
  for name, source in data.sources.items():
    for key in source.keys():
      strict.check_known(key, source_fields, f"config.data.sources.{name}")


def _check_batch(exp_parts: dict[str, Any], mesh_shape: Mapping[str, int]) -> None:
  """Batch against the mesh and micro-batches, on a device-free mesh of the resolved sizes."""
  data, optimizer, mesh = exp_parts["data"], exp_parts["optimizer"], exp_parts["mesh"]
  rules = rules_lib.rules_for(mesh.strategy)
  abstract = jax.sharding.AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape))
  for what, batch, micro in (("data.global_batch_size", data.global_batch_size,
                              optimizer.num_microbatches),
                             ("data.eval_batch_size", data.eval_batch_size, 1)):
    try:
      step_functions.check_batch_shape(batch, data.seq_len, abstract, micro, rules)
    except ValueError as e:
      raise ValueError(f"config.{what}={batch} does not fit mesh {dict(mesh_shape)}: {e}") from e


def _check_eval(eval_config: eval_lib.EvalConfig) -> None:
  """Downstream evaluation during training: lm-eval installed and every task name known to it."""
  eval_lib.require_lm_eval()
  from recurrentgemma_tpu.downstream import registry  # pylint: disable=g-import-not-at-top
  try:
    registry.check_tasks(eval_config.task_names)
  except ValueError as e:
    raise ValueError(f"config.eval.tasks={eval_config.tasks!r}: {e}") from e


def _schedule_length(optimizer: Mapping[str, Any], steps: int) -> dict[str, Any]:
  """`config.optimizer` with a schedule that follows the run (`decay_steps=0`) resolved for `steps`.

  Following the run, the cosine's length is `train.steps` and the warm-up at most a tenth of it
  (the presets' recipe, configs/recipe.py), so `--config.train.steps=N` moves the whole schedule
  with the run. A `decay_steps` set to a number is kept as set, on purpose. `config.json` keeps the
  0, so extending a finished run (a larger `train.steps`, which resuming allows) stretches its
  schedule to the new length; set `decay_steps` to the old length to keep the old schedule instead.
  """
  group = dict(optimizer.items())
  if group.get("decay_steps") != 0:
    return group
  group["decay_steps"] = steps
  warmup = group.get("warmup_steps")
  if isinstance(warmup, int) and not isinstance(warmup, bool):
    group["warmup_steps"] = min(warmup, int(MAX_WARMUP_FRACTION * steps))
  return group


def _with_defaults(saved: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
  """`saved` with every field it lacks taken from `defaults`, recursively; named data sources get
  the fields of one source, never a source of their own."""
  out = dict(saved)
  for key, default in defaults.items():
    if key not in out:
      out[key] = default
    elif key == "sources" and isinstance(out[key], dict):
      template = next(iter(default.values()))
      out[key] = {name: _with_defaults(src, template) for name, src in out[key].items()}
    elif isinstance(default, dict) and isinstance(out[key], dict):
      out[key] = _with_defaults(out[key], default)
  return out


def from_workdir(workdir: str, *, single_host: bool = False) -> Experiment:
  """The Experiment a training workdir was written with (its config.json), built again.

  For tools that read a run (sample, export, evaluate): `init_from` is dropped (the workdir's own
  checkpoints are what is read) and downstream evaluation during training is off. Fields that were
  added to `configs/base.py` after the run was written take their defaults there, so an older
  workdir still loads. The mesh is resolved for this job's devices, or with `single_host` for the
  fewest it accepts.

  Raises:
    UserError: the workdir has no config.json.
  """
  import json  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import exit_codes  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  path = workdir_lib.join(workdir, workdir_lib.CONFIG_FILE)
  if not workdir_lib.exists(path):
    raise exit_codes.UserError(f"--workdir={workdir} has no {workdir_lib.CONFIG_FILE}: give a "
                               "directory written by `python -m recurrentgemma_tpu.train`.")
  saved = json.loads(workdir_lib.read_text(path))
  config = ml_collections.ConfigDict(_with_defaults(saved, base.get_config().to_dict()))
  config.checkpoint.init_from = ""
  config.eval.every = 0
  return build(config, num_devices=min_devices(config) if single_host else None)


def min_devices(config: ml_collections.ConfigDict) -> int:
  """The fewest devices `config.mesh` accepts (an axis of -1 gets 1): for single-host tools."""
  mesh = strict.typed(mesh_lib.MeshConfig, config.mesh, "config.mesh")
  sizes = [getattr(mesh, a) for a in mesh_lib.ICI_AXES]
  return math.prod(s for s in sizes if s != -1) * mesh.num_slices


def build(config: ml_collections.ConfigDict, num_devices: int | None = None) -> Experiment:
  """Validates `config` completely, without compiling anything, and returns its `Experiment`.

  Args:
    config: a full experiment config (configs/base.py), usually from `load_config`.
    num_devices: devices the run will use (the mesh is resolved for them); default all of
      `jax.device_count()`. Planning tools pass a topology's count.

  Raises:
    ValueError: naming the bad field (or combination) and what would be valid.
    FileNotFoundError: `checkpoint.init_from` names nothing readable.
  """
  for group in config.keys():
    strict.check_known(group, GROUPS, "config")
  missing = [g for g in GROUPS if g not in config]
  if missing:
    raise ValueError(f"config has no {missing} group(s); build configs on configs/base.get_config().")
  parts: dict[str, Any] = {}
  parts["model"] = strict.typed(model_lib.ModelConfig, config.model, "config.model")
  parts["train"] = strict.typed(TrainConfig, config.train, "config.train")
  parts["optimizer"] = strict.typed(optimizer_lib.OptimizerConfig,
                                    _schedule_length(config.optimizer, parts["train"].steps),
                                    "config.optimizer")
  # Retention against the save interval is checked by CheckpointOptions itself.
  parts["checkpoint"] = strict.typed(ckpt_lib.CheckpointOptions, config.checkpoint,
                                     "config.checkpoint", exclude=("init_from",))
  parts["mesh"] = strict.typed(mesh_lib.MeshConfig, config.mesh, "config.mesh")
  parts["eval"] = strict.typed(eval_lib.EvalConfig, config.eval, "config.eval")
  parts["spikes"] = strict.typed(spikes_lib.SpikeConfig, config.spikes, "config.spikes")
  _check_data_fields(config.data)
  parts["data"] = data_lib.data_config_from(config)

  num_devices = jax.device_count() if num_devices is None else int(num_devices)
  mesh_shape = parts["mesh"].resolve(num_devices)
  rules_lib.check_strategy_mesh(parts["mesh"].strategy, mesh_shape)
  _check_batch(parts, mesh_shape)

  init_from = config.checkpoint.init_from
  if not isinstance(init_from, str):
    raise ValueError(f"config.checkpoint.init_from={init_from!r} must be a string.")
  if init_from and hf_bridge.is_hf(init_from):  # transformers checkpoint: its config.json only
    hf_bridge.check_importable(init_from, parts["model"])
  elif init_from:
    ckpt_lib.resolve_params_path(init_from)  # a bad path fails now, not after data preparation
  if parts["eval"].every:
    _check_eval(parts["eval"])
  return Experiment(**parts, init_from=init_from, num_devices=num_devices,
                    mesh_shape=dict(mesh_shape), config=config)


def replace(exp: Experiment, overrides: Iterable[str], num_devices: int | None = None) -> Experiment:
  """A new Experiment from `exp`'s config with `group.field=value` overrides, validated again."""
  config = exp.config.copy_and_resolve_references()
  apply_overrides(config, overrides)
  return build(config, exp.num_devices if num_devices is None else num_devices)


def describe(exp: Experiment) -> str:
  """One line: model size and the run's tokens (for logs)."""
  return (f"{exp.model.num_layers} layers x width {exp.model.width}, "
          f"{exp.data.global_batch_size} x {exp.data.seq_len} tokens/step x {exp.train.steps} steps "
          f"= {exp.total_tokens / 1e9:.3g}B tokens, mesh {dict(exp.mesh_shape)}")

