"""Resume policy: continue the run in a workdir, start from `init_from`, or start fresh.

`restore_or_init` is the only place that decides. Its rules:

1. The newest checkpoint's `meta` item is read alone and compared with the requested experiment
   (`compare`) before any array is read. A change to a field that alters array shapes, the numerics
   of a step or the data stream stops the job (`ResumeRefused`, exit 2) naming every field
   `old -> new` and the ways forward; nothing is moved or deleted. `accept_changes` lets the user
   take a named field over deliberately (e.g. a new learning rate).
2. Arrays are then restored onto the current mesh and verified against their checksums. Damaged
   steps are quarantined by the manager and the previous step is used; a workdir whose checkpoints
   are all damaged is refused, never restarted from step 0.
3. Only a workdir with no checkpoint starts at step 0: from `init_from`'s parameters if given, else
   from a fresh initialisation.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any, Iterable, Mapping, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp

from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import step_functions
from recurrentgemma_tpu import train_step as train_step_lib
from recurrentgemma_tpu.checkpoints import manager as ckpt_lib

# Config fields that may differ between a checkpoint and the run that resumes it: they change
# neither the shapes of the arrays, the mathematics of a step, nor the data stream. (Mesh and
# micro-batches change the order of floating-point sums, not what is computed.) Every other field is
# compared. Patterns use fnmatch syntax on dotted paths.
COMPATIBLE = (
    "train.steps", "train.log_every", "train.eval_every", "train.peak_flops_per_device",
    "checkpoint.*", "mesh.*",
    "model.remat", "model.scan_impl",
    "optimizer.num_microbatches",
    "data.eval_batch_size", "data.num_eval_batches", "data.cache_dir", "data.sources.*.tfds_data_dir",
    # Where the (content-keyed, checked) store lives and how it is read; not what it holds.
    "data.store", "data.prefetch_steps", "data.read_threads",
)


class ResumeRefused(exit_codes.UserError):
  """The workdir holds a different run than the one requested (exit 2, nothing moved)."""


class Resumed(NamedTuple):
  """What `restore_or_init` returns: the state, its step, and how it was obtained."""

  state: train_step_lib.TrainState
  step: int
  source: str  # "checkpoint" | "init_from" | "fresh"


def state_item(state: train_step_lib.TrainState) -> dict[str, Any]:
  """The non-parameter part of the train state, as saved in the checkpoint's `state` item."""
  return {"step": state.step, "opt_state": state.opt_state}


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_checkpoint(fns: step_functions.StepFunctions) -> tuple[Any, Any]:
  """Restore targets (params, state item) laid out on `fns`'s mesh: restoring reshards onto it."""
  return (_abstract(fns.abstract_state.params, fns.state_shardings.params),
          _abstract(state_item(fns.abstract_state), state_item(fns.state_shardings)))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def compare(saved: Mapping[str, Any], requested: Mapping[str, Any],
            accept: Iterable[str] = ()) -> tuple[list[str], list[str]]:
  """(changed, one_sided) between two configs (as JSON dicts), ignoring COMPATIBLE and `accept`.

  changed: "field: old -> new" for fields that differ; one_sided: fields present on one side only
  (the code gained or lost a field since the save; their default is assumed to keep behaviour).
  """
  patterns = tuple(COMPATIBLE) + tuple(accept)
  old, new = _flatten(dict(saved)), _flatten(dict(requested))
  changed, one_sided = [], []
  for key in sorted(set(old) | set(new)):
    if any(fnmatch.fnmatchcase(key, p) or key.startswith(p + ".") for p in patterns):
      continue
    if key not in old or key not in new:
      one_sided.append(key)
    elif old[key] != new[key]:
      changed.append(f"{key}: {old[key]!r} -> {new[key]!r}")
  return changed, one_sided


def check_resumable(meta: Mapping[str, Any], requested_json: str, directory: str,
                    accept: Iterable[str] = ()) -> None:
  """Raises ResumeRefused when the checkpoint's config differs from the request in a checked field."""
  saved = json.loads(meta.get("config", "{}"))
  changed, one_sided = compare(saved, json.loads(requested_json), accept)
  if one_sided:
    logging.warning("Resuming although these config fields exist on one side only: %s", one_sided)
  if changed:
    raise ResumeRefused(
        f"Refusing to resume {directory} (step {meta.get('step')}): the requested run differs from "
        f"the checkpointed one in fields that change array shapes, numerics or the data stream: "
        f"{'; '.join(changed)}. Nothing was moved or deleted. Ways forward: train this config in "
        "another --workdir; or start a deliberate new run from these weights with another --workdir "
        f"and --init_from={directory}; or, if the change is intended and the arrays still fit, "
        "re-run with --accept_config_changes="
        + ",".join(c.split(":")[0] for c in changed) + ".")


def restore_or_init(exp: Any, fns: step_functions.StepFunctions, ckpt: ckpt_lib.CheckpointManager,
                    accept_changes: Iterable[str] = ()) -> Resumed:
  """Resumes `exp` from `ckpt`'s newest intact step, else starts at step 0 (see the module doc)."""
  abstract_params, abstract_rest = abstract_checkpoint(fns)
  check = lambda meta: check_resumable(meta, exp.to_json(), str(ckpt.directory), accept_changes)
  try:
    restored = ckpt.restore_latest(abstract_params, abstract_rest, check=check)
  except ckpt_lib.CheckpointMismatch as e:
    raise ResumeRefused(f"{e} Train this config in another --workdir (or --init_from it).") from e
  except ckpt_lib.CheckpointDamaged as e:
    raise ResumeRefused(str(e)) from e
  if restored is not None:
    state = train_step_lib.TrainState(step=restored.state["step"], params=restored.params,
                                      opt_state=restored.state["opt_state"])
    logging.info("Resumed from %s at step %d.", ckpt.directory, restored.step)
    return Resumed(state, restored.step, "checkpoint")
  if ckpt.quarantine_dir.exists() and any(ckpt.quarantine_dir.iterdir()):
    raise ResumeRefused(
        f"{ckpt.directory} holds no intact checkpoint, but damaged ones were moved to "
        f"{ckpt.quarantine_dir}; this workdir is not restarted from step 0. Recover a step by hand "
        "(docs/training.md), delete that directory to start over here, or use another --workdir.")
  if exp.init_from:
    params = ckpt_lib.load_params(exp.init_from, abstract_params)
    opt_state = jax.jit(fns.tx.init, out_shardings=fns.state_shardings.opt_state)(params)
    state = train_step_lib.TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), fns.state_shardings.step), params=params,
        opt_state=opt_state)
    logging.info("Initialised parameters from %s.", exp.init_from)
    return Resumed(state, 0, "init_from")
  return Resumed(fns.create_state(jax.random.key(exp.train.seed)), 0, "fresh")
