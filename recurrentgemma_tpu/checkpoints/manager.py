"""Orbax checkpointing for training: async saves, retention, safe resume, resharded restore.

A training checkpoint is one Orbax step directory `<workdir>/checkpoints/<step>/` holding three items:

* `params`: the model parameters (a plain Orbax pytree, so `--init_from` and the converter of the
  published RecurrentGemma checkpoints share one format: see `save_params` / `load_params`);
* `state`: everything else the train step carries (optimizer state, step counter, RNG key);
* `meta`: JSON with the step, the data position and the full config, so a checkpoint explains itself.

Safety rests on Orbax's atomic commit: a step is written under a temporary name and renamed (or, on
object stores, marked with a commit file) only once every host has finished, so a save interrupted
by SIGKILL or preemption never shows up as a step. A step that *is* committed but cannot be read
(disk corruption, a truncated copy) is moved aside with a warning and the previous step is used.

Arrays are restored straight into the shardings of the abstract target handed to `restore`, so a
checkpoint written on 8 devices restores onto 4 or 1 (or another mesh shape) without a detour
through host memory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any, Mapping, NamedTuple

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any

# Item names inside a step directory; `load_params` relies on `PARAMS_ITEM`.
PARAMS_ITEM = "params"
STATE_ITEM = "state"
META_ITEM = "meta"
_ITEMS = (PARAMS_ITEM, STATE_ITEM, META_ITEM)

# Where unreadable steps are moved so they are neither retried nor overwritten.
_CORRUPT_DIR = "corrupt"


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
  """Typed view of `config.checkpoint` (see configs/base.py for the meaning of each field)."""

  save_every: int
  keep_last: int
  keep_every: int
  async_save: bool

  def __post_init__(self):
    if self.save_every < 0:
      raise ValueError(
          f"checkpoint.save_every={self.save_every} must be >= 0 (0 disables periodic saves).")
    if self.keep_last < 1:
      raise ValueError(f"checkpoint.keep_last={self.keep_last} must be >= 1.")
    if self.keep_every < 0:
      raise ValueError(f"checkpoint.keep_every={self.keep_every} must be >= 0 (0 keeps none extra).")
    if self.keep_every and self.save_every and self.keep_every % self.save_every:
      raise ValueError(
          f"checkpoint.keep_every={self.keep_every} must be a multiple of "
          f"checkpoint.save_every={self.save_every}, otherwise no saved step is ever kept.")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "CheckpointOptions":
    """Builds the options from the `checkpoint` group of a config."""
    return cls(
        save_every=int(config.save_every),
        keep_last=int(config.keep_last),
        keep_every=int(config.keep_every),
        async_save=bool(config.async_save),
    )


class Restored(NamedTuple):
  """What `CheckpointManager.restore` returns."""

  step: int
  params: PyTree
  state: PyTree
  meta: dict[str, Any]


class CheckpointManager:
  """Saves and restores training checkpoints under one directory (all processes call every method)."""

  def __init__(self, directory: str | os.PathLike[str], options: CheckpointOptions):
    self.directory = epath.Path(directory)
    self.options = options
    self._manager = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        item_names=_ITEMS,
        options=ocp.CheckpointManagerOptions(
            # The trainer decides when to save (periodic, preemption, final); Orbax only keeps order.
            save_interval_steps=1,
            max_to_keep=self.options.keep_last,
            keep_period=self.options.keep_every or None,
            enable_async_checkpointing=self.options.async_save,
            # Leftovers of a save that was killed midway are deleted at start-up, never read.
            cleanup_tmp_directories=True,
            create=True,
        ),
    )

  # ---------------------------------------------------------------- queries

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (interrupted saves are not listed)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or None."""
    return self._manager.latest_step()

  def is_periodic_step(self, step: int) -> bool:
    """True when `step` is one of the regular `save_every` steps."""
    return bool(self.options.save_every) and step % self.options.save_every == 0

  # ---------------------------------------------------------------- saving

  def save(self, step: int, params: PyTree, state: PyTree, meta: Mapping[str, Any]) -> bool:
    """Starts saving `step` (asynchronously when configured); False if that step already exists.

    The arrays are copied to host before this returns, so the caller may donate them to the next step.
    """
    if step in self._manager.all_steps():
      return False
    meta = dict(meta, step=int(step), saved_at=time.time())
    return self._manager.save(
        step,
        args=ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardSave(params),
            STATE_ITEM: ocp.args.StandardSave(state),
            META_ITEM: ocp.args.JsonSave(meta),
        }),
        force=True,
    )

  def wait_until_finished(self) -> None:
    """Blocks until the last async save is committed (raises if it failed)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases Orbax's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  # ---------------------------------------------------------------- restoring

  def restore(self, step: int, abstract_params: PyTree, abstract_state: PyTree) -> Restored:
    """Restores `step` onto the shardings of the abstract (ShapeDtypeStruct) targets."""
    out = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardRestore(abstract_params),
            STATE_ITEM: ocp.args.StandardRestore(abstract_state),
            META_ITEM: ocp.args.JsonRestore(),
        }),
    )
    return Restored(step=step, params=out[PARAMS_ITEM], state=out[STATE_ITEM], meta=dict(out[META_ITEM]))

  def restore_latest(self, abstract_params: PyTree, abstract_state: PyTree) -> Restored | None:
    """Restores the newest readable step; unreadable newer steps are moved aside with a warning.

    Returns None when the directory holds no committed step (a fresh run).
    """
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, abstract_params, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        # Any read failure (missing file, bad metadata, tensorstore error) means this step is
        # unusable; the previous one is still a consistent training state.
        logging.warning(
            "Checkpoint step %d in %s cannot be restored (%s: %s); falling back to the previous step.",
            step, self.directory, type(e).__name__, e)
        self._quarantine(step)
    return None

  def _quarantine(self, step: int) -> None:
    """Moves an unreadable step out of Orbax's view, so it is not retried and its number can be reused."""
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dst = self.directory.parent / f"{self.directory.name}_{_CORRUPT_DIR}" / f"{step}.{int(time.time())}"
      dst.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(os.fspath(src), os.fspath(dst))
      logging.warning("Moved unreadable checkpoint %s to %s.", src, dst)
    _sync_processes(f"quarantine_{step}")
    self._manager.reload()


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# -------------------------------------------------------------------- parameters only


def save_params(path: str | os.PathLike[str], params: PyTree) -> None:
  """Writes a parameters-only checkpoint that `load_params` (and `--init_from`) reads."""
  path = epath.Path(path)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path.absolute(), params)
    checkpointer.wait_until_finished()


def resolve_params_path(path: str | os.PathLike[str]) -> epath.Path:
  """Finds the parameters item behind `path`.

  Accepts, in this order: a parameters-only checkpoint (`save_params`), a step directory of a training
  checkpoint, a training checkpoint directory (its newest step), or a training workdir.
  """
  path = epath.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"init_from={os.fspath(path)!r} does not exist.")
  if (path / PARAMS_ITEM).is_dir():
    return path / PARAMS_ITEM
  if (path / "_METADATA").exists():  # a pytree checkpoint itself (its subdirectories are not steps)
    return path
  for root in (path, path / "checkpoints"):
    if root.is_dir():
      steps = [s for s in ocp.utils.checkpoint_steps(root) if (root / str(s) / PARAMS_ITEM).is_dir()]
      if steps:
        return root / str(max(steps)) / PARAMS_ITEM
  raise FileNotFoundError(
      f"init_from={os.fspath(path)!r} is neither a parameters checkpoint (written by save_params or "
      "`python -m recurrentgemma_tpu.checkpoints.convert` conversion), a training checkpoint step, "
      "a checkpoint directory nor a workdir with checkpoints/.")


def load_params(path: str | os.PathLike[str], abstract_params: PyTree) -> PyTree:
  """Restores parameters from any location `resolve_params_path` accepts onto the target shardings.

  The tree structure, shapes and dtypes must match `abstract_params`; a mismatch raises naming the path.
  """
  params_path = resolve_params_path(path)
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      return checkpointer.restore(params_path, abstract_params)
    except (ValueError, KeyError) as e:
      raise ValueError(
          f"Parameters at {os.fspath(params_path)!r} do not match this model config "
          f"(different architecture or vocab size?): {e}") from e
