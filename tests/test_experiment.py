"""`experiment.build`: every group strict by name, each cross-group check, loading and overrides."""

import dataclasses
import os

import pytest

from recurrentgemma_tpu import experiment as experiment_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")

# One misspelling of a real field per group (and of a data source's field).
TYPOS = [
    ("model", "widht", "width"),
    ("data", "global_batch_sise", "global_batch_size"),
    ("optimizer", "learning_rat", "learning_rate"),
    ("train", "stepz", "steps"),
    ("checkpoint", "save_evry", "save_every"),
    ("mesh", "modle", "model"),
    ("data.sources.default", "pattren", "pattern"),
]


def _tiny(*overrides):
  return experiment_lib.load_config(TINY, overrides)


@pytest.mark.parametrize("group, typo, field", TYPOS)
def test_typo_in_any_group_is_refused_by_name(group, typo, field):
  # A config built in code (a preset, a sweep) is not locked: the typo becomes a new field.
  config = _tiny()
  config.unlock()
  node = config
  for part in group.split("."):
    node = node[part]
  node[typo] = 1
  with pytest.raises(ValueError, match=rf"config\.{group}\.{typo} is not a field of config\.{group} "
                                       rf"\(did you mean config\.{group}\.{field}\?\)"):
    experiment_lib.build(config, num_devices=1)


@pytest.mark.parametrize("group, typo, field", TYPOS)
def test_typo_in_an_override_is_refused_by_name(group, typo, field):
  with pytest.raises(ValueError, match=rf"config\.{group}\.{typo} is not a field.*did you mean "
                                       rf"config\.{group}\.{field}"):
    _tiny(f"{group}.{typo}=1")


def test_unknown_group_is_refused_by_name():
  config = _tiny()
  config.unlock()
  config.trian = config.train
  with pytest.raises(ValueError, match=r"config\.trian is not a field of config \(did you mean "
                                       r"config\.train\?\)"):
    experiment_lib.build(config, num_devices=1)


@pytest.mark.parametrize("override, match", [
    ("train.steps=true", r"config\.train\.steps=True must be an integer"),
    ("mesh.strategy=dp", None),  # valid on one device
])
def test_values_are_checked_against_the_field_type(override, match):
  config = _tiny()
  config.unlock()
  key, value = override.split("=")
  group, field = key.split(".")
  config[group][field] = {"true": True}.get(value, value)
  if match is None:
    assert experiment_lib.build(config, num_devices=1).mesh.strategy == "dp"
  else:
    with pytest.raises(ValueError, match=match):
      experiment_lib.build(config, num_devices=1)


@pytest.mark.parametrize("overrides, num_devices, match", [
    (("mesh.strategy=dp", "mesh.model=2", "mesh.fsdp=1"), 2, r"strategy='dp' does not shard over"),
    (("mesh.model=3",), 8, r"cannot fill -1 for 'fsdp'"),
    (("data.global_batch_size=4",), 8, r"global_batch_size=4 does not fit mesh.*multiple of 8"),
    (("optimizer.num_microbatches=3",), 1, r"does not divide into optimizer.num_microbatches=3"),
    (("optimizer.num_microbatches=2",), 8, r"micro-batch of 4 sequences .* multiple of 16"),
    (("checkpoint.save_every=200", "checkpoint.keep_every=300"), 1, r"keep_every=300 must be a multiple"),
    (("train.log_every=0",), 1, r"config\.train\.log_every=0 must be > 0"),
])
def test_cross_group_checks_fail_before_anything_is_built(overrides, num_devices, match):
  with pytest.raises(ValueError, match=match):
    experiment_lib.build(_tiny(*overrides), num_devices=num_devices)


def test_init_from_must_exist():
  with pytest.raises(FileNotFoundError, match="init_from='/nonexistent/ckpt' does not exist"):
    experiment_lib.build(_tiny("checkpoint.init_from=/nonexistent/ckpt"), num_devices=1)


def test_overrides_parse_like_the_command_line():
  exp = experiment_lib.build(_tiny("train.steps=7", "optimizer.learning_rate=1e-3", "model.remat=block",
                                   "checkpoint.async_save=false"), num_devices=1)
  assert exp.train.steps == 7 and exp.optimizer.learning_rate == 1e-3
  assert exp.model.remat == "block" and exp.checkpoint.async_save is False
  assert exp.tokens_per_step == 8 * 256 and exp.total_tokens == 7 * 8 * 256


def test_fingerprint_follows_the_config_not_the_devices():
  one = experiment_lib.build(_tiny(), num_devices=1)
  assert experiment_lib.build(_tiny(), num_devices=8).fingerprint() == one.fingerprint()
  assert experiment_lib.build(_tiny("data.seed=1"), num_devices=1).fingerprint() != one.fingerprint()
  again = experiment_lib.replace(one, ["train.steps=601"])
  assert again.train.steps == 601 and one.train.steps == 600  # the original is untouched
  assert '"steps": 601' in again.to_json()


def test_configs_base_is_the_single_source_of_defaults():
  # ModelConfig declares no defaults; the two dataclasses that keep them for direct construction
  # must agree with configs/base.py field for field.
  from configs import base  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import strict  # pylint: disable=g-import-not-at-top
  from sharding import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(model_lib.ModelConfig))
  assert strict.typed(mesh_lib.MeshConfig, base.mesh(), "config.mesh") == mesh_lib.MeshConfig()
  # base.optimizer's schedule follows the run (decay_steps=0): resolved at base.train's length.
  optimizer = experiment_lib._schedule_length(base.optimizer(), base.train().steps)  # pylint: disable=protected-access
  assert (strict.typed(optimizer_lib.OptimizerConfig, optimizer, "config.optimizer")
          == optimizer_lib.OptimizerConfig())


@pytest.mark.parametrize("spec", ["tiny", "ladder:hawk,100m"])
def test_schedule_follows_a_shortened_run_unless_set_on_purpose(spec):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  for steps in (7, 200):
    o = experiment_lib.build(experiment_lib.load_config(spec, [f"train.steps={steps}"]),
                             num_devices=1).optimizer
    assert o.decay_steps == steps and o.warmup_steps <= steps // 10
    # The last update of the run uses the final rate (peak x final_lr_ratio), not the peak.
    lr = optimizer_lib.learning_rate_schedule(o)
    np.testing.assert_allclose(float(lr(steps - 1)), o.learning_rate * o.final_lr_ratio, rtol=1e-6)
  exp = experiment_lib.build(experiment_lib.load_config(
      spec, ["train.steps=200", "optimizer.decay_steps=1000", "optimizer.warmup_steps=30"]), 1)
  assert (exp.optimizer.decay_steps, exp.optimizer.warmup_steps) == (1000, 30)


def test_an_older_workdir_s_config_loads_with_the_defaults_of_fields_added_since(tmp_path):
  """sample, export and evaluate rebuild a run from its config.json; one written before a group or
  field existed (here `eval`, `data.store` and a source's `text_key`) takes base.py's defaults,
  and a run's named sources gain no `default` source."""
  import json  # pylint: disable=g-import-not-at-top
  config = experiment_lib.load_config("tiny", ["train.steps=7"])
  saved = json.loads(config.to_json())
  saved["data"]["sources"] = {"web": saved["data"]["sources"]["default"]}
  saved["data"]["sources"]["web"]["rate"] = 2.0
  complete = json.loads(json.dumps(saved))
  del saved["eval"], saved["data"]["store"], saved["data"]["sources"]["web"]["text_key"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  exp = experiment_lib.from_workdir(str(tmp_path), single_host=True)
  assert list(exp.config.data.sources) == ["web"]
  assert exp.config.data.sources.web.rate == 2.0 and exp.train.steps == 7
  expected = experiment_lib.build(
      experiment_lib.ml_collections.ConfigDict(complete), num_devices=exp.num_devices)
  assert exp.to_json() == expected.to_json()
  with pytest.raises(ValueError, match="has no config.json"):
    experiment_lib.from_workdir(str(tmp_path / "missing"))
