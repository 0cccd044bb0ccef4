"""Resume policy: continue the run in a workdir, start from `init_from`, or start fresh.

`restore_or_init` is the only place that decides, and `restore_newest` the only place that judges a
checkpoint that does not read. Damage is judged by outcome, never by the type of an exception
(TensorStore reports a short or missing chunk as a generic error, a garbled JSON file as a decode
error, an unreachable bucket as yet another): a step is damaged when it fails to read the same way
on a second read (or fails its checksums) *and* an older step then restores and verifies. In order:

1. No committed step: start at step 0, from `init_from`'s parameters if given, else fresh; but a
   workdir whose steps were all set aside before is refused (exit 2), never restarted from zero.
2. The newest `meta` that reads is compared with the request (`check_resumable`): a changed field
   is refused (exit 2) with only the hints that can work, as are arrays of other shapes; nothing moved.
3. Steps are tried newest first. A read that fails is read again (the manager's `_read`) until it
   succeeds, fails the same way twice, or fails differently 4 times; a checksum mismatch is final.
4. The first step that restores and verifies is used; only then is each newer step that failed the
   same way moved to `checkpoints_corrupt/` (one warning line: step, file, error).
5. A step that failed differently every time, or no step restoring at all (storage down, or every
   step damaged), moves nothing and stops with one line naming each step and its error, exit 1:
   the code the launcher retries (an outage passes; damage everywhere needs a person either way).

docs/training.md has the same rule as a table (failure, what resume does, exit code).
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp

from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import step_functions
from recurrentgemma_tpu import train_step as train_step_lib
from recurrentgemma_tpu.checkpoints import integrity as integrity_lib
from recurrentgemma_tpu.checkpoints import hf_bridge
from recurrentgemma_tpu.checkpoints import manager as ckpt_lib

# Config fields that may differ between a checkpoint and the run that resumes it: they change
# neither the shapes of the arrays, the mathematics of a step, nor the data stream. (Mesh and
# micro-batches change the order of floating-point sums, not what is computed.) Every other field is
# compared. Patterns use fnmatch syntax on dotted paths.
COMPATIBLE = (
    "train.steps", "train.log_every", "train.eval_every", "train.peak_flops_per_device",
    "checkpoint.*", "mesh.*", "eval.*",
    # The spike rule and budget decide only future rollbacks; recorded ones are kept whatever they are
    # (raising the budget of a run that spent it, then re-running, is how it continues).
    "spikes.*",
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
  meta: dict[str, Any] | None = None  # the checkpoint's metadata (source "checkpoint")


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


def _hints(directory: str, changed: list[str], saved_arrays: Mapping[str, Any] | None,
           requested_arrays: Mapping[str, Any] | None) -> str:
  """The ways forward that can work: --init_from only if the parameters fit, --accept_config_changes
  only if every array fits; another architecture leaves another workdir alone."""
  fields = ",".join(c.split(":")[0] for c in changed)
  if saved_arrays is None or requested_arrays is None:  # written before arrays were recorded
    params_fit = all_fit = True
    caveat = " (if the arrays still fit)"
  else:
    differ = [p for p in set(saved_arrays) | set(requested_arrays)
              if saved_arrays.get(p) != requested_arrays.get(p)]
    params_fit = not any(p.startswith(f"{ckpt_lib.PARAMS_ITEM}/") for p in differ)
    all_fit, caveat = not differ, ""
  ways = ["train this config in another --workdir"]
  if params_fit:
    ways.append(f"start a deliberate new run from these weights with another --workdir and "
                f"--init_from={directory}")
  if all_fit:
    ways.append(f"if the change is intended{caveat}, re-run with --accept_config_changes={fields}")
  why = "" if params_fit else (" (the checkpoint's parameters have other shapes or names, so "
                               "neither --init_from nor --accept_config_changes can use them)")
  return f"Ways forward: {'; or '.join(ways)}{why}."


def check_resumable(meta: Mapping[str, Any], requested_json: str, directory: str,
                    accept: Iterable[str] = (),
                    requested_arrays: Mapping[str, Any] | None = None) -> None:
  """Raises ResumeRefused when the checkpoint's config differs from the request in a checked field.

  `requested_arrays` ({path: [shape, dtype]}, `integrity.array_specs`) decides which hints can work.
  """
  saved = json.loads(meta.get("config", "{}"))
  changed, one_sided = compare(saved, json.loads(requested_json), accept)
  if one_sided:
    logging.warning("Resuming although these config fields exist on one side only: %s", one_sided)
  if changed:
    raise ResumeRefused(
        f"Refusing to resume {directory} (step {meta.get('step')}): the requested run differs from "
        f"the checkpointed one in fields that change array shapes, numerics or the data stream: "
        f"{'; '.join(changed)}. Nothing was moved or deleted. "
        + _hints(directory, changed, meta.get("arrays"), requested_arrays))


def restore_newest(ckpt: ckpt_lib.CheckpointManager, abstract_params: Any, abstract_state: Any,
                   check: Callable[[dict[str, Any]], None] | None = None) -> ckpt_lib.Restored | None:
  """Restores the newest step that reads and verifies, judging the newer ones (the module's rule).

  `check(meta)` runs on the newest readable `meta` before any array is read; what it raises (a
  refused resume) and CheckpointMismatch propagate with nothing moved. Returns None when the
  directory holds no committed step; raises StorageError when no step restores.
  """
  steps = ckpt.all_steps()
  failed: list[ckpt_lib.StepUnreadable] = []
  checked = False
  for step in reversed(steps):
    try:
      meta = ckpt.read_meta(step)
      if check is not None and not checked:
        check(meta)
        checked = True
      restored = ckpt.restore(step, abstract_params, abstract_state, meta)
    except ckpt_lib.StepUnreadable as e:
      if not e.persistent:
        raise ckpt_lib.StorageError(
            f"Reading checkpoint step {step} in {ckpt.directory} failed {e.reads} times, differently "
            f"each time (last: {e.path}: {e.error}); the storage looks unreliable, so nothing is "
            "judged and nothing was moved. Re-run the same command to retry.") from e
      failed.append(e)
      continue
    # Only now is damage shown: an older step reads where the newer ones fail the same way.
    for e in failed:
      moved_to = ckpt.quarantine(e.step)
      logging.warning(
          "Checkpoint step %d is damaged: %s: %s (read %d time(s); step %d restores and verifies); "
          "moved it to %s, nothing deleted; continuing from step %d.",
          e.step, e.path, e.error, e.reads, step, moved_to, step)
    return restored
  if failed:
    raise ckpt_lib.StorageError(
        f"No checkpoint in {ckpt.directory} could be read, so nothing was moved and nothing restarts "
        f"from step 0: {'; '.join(str(e) for e in failed)}. If the storage is unreachable, re-run the "
        "same command once it is back; if these files are damaged, see docs/training.md "
        "('Recovering a quarantined step').")
  return None


def _resumed(restored: ckpt_lib.Restored) -> Resumed:
  state = train_step_lib.TrainState(step=restored.state["step"], params=restored.params,
                                    opt_state=restored.state["opt_state"])
  return Resumed(state, restored.step, "checkpoint", dict(restored.meta))


def restore_step(fns: step_functions.StepFunctions, ckpt: ckpt_lib.CheckpointManager,
                 step: int) -> Resumed:
  """Restores committed step `step` as the train state (a loss-spike rollback); StepUnreadable if
  it does not read."""
  abstract_params, abstract_rest = abstract_checkpoint(fns)
  return _resumed(ckpt.restore(step, abstract_params, abstract_rest))


def restore_or_init(exp: Any, fns: step_functions.StepFunctions, ckpt: ckpt_lib.CheckpointManager,
                    accept_changes: Iterable[str] = ()) -> Resumed:
  """Resumes `exp` from `ckpt`'s newest intact step, else starts at step 0 (see the module doc)."""
  abstract_params, abstract_rest = abstract_checkpoint(fns)
  requested_arrays = integrity_lib.array_specs(
      {ckpt_lib.PARAMS_ITEM: abstract_params, ckpt_lib.STATE_ITEM: abstract_rest})
  check = lambda meta: check_resumable(meta, exp.to_json(), str(ckpt.directory), accept_changes,
                                       requested_arrays)
  try:
    restored = restore_newest(ckpt, abstract_params, abstract_rest, check=check)
  except ckpt_lib.CheckpointMismatch as e:
    ways = "train this config in another --workdir" + (
        " (or start one from these weights with --init_from)" if e.params_fit else "")
    raise ResumeRefused(f"{e} Ways forward: {ways}.") from e
  if restored is not None:
    logging.info("Resumed from %s at step %d.", ckpt.directory, restored.step)
    return _resumed(restored)
  if ckpt.quarantine_dir.exists() and any(ckpt.quarantine_dir.iterdir()):
    raise ResumeRefused(
        f"{ckpt.directory} holds no intact checkpoint, but damaged ones were moved to "
        f"{ckpt.quarantine_dir}; this workdir is not restarted from step 0. Recover a step by hand "
        "(docs/training.md), delete that directory to start over here, or use another --workdir.")
  if exp.init_from:
    params = (hf_bridge.load_params(exp.init_from, exp.model, abstract_params)
              if hf_bridge.is_hf(exp.init_from) else ckpt_lib.load_params(exp.init_from, abstract_params))
    opt_state = jax.jit(fns.tx.init, out_shardings=fns.state_shardings.opt_state)(params)
    state = train_step_lib.TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), fns.state_shardings.step), params=params,
        opt_state=opt_state)
    logging.info("Initialised parameters from %s.", exp.init_from)
    return Resumed(state, 0, "init_from")
  return Resumed(fns.create_state(jax.random.key(exp.train.seed)), 0, "fresh")
