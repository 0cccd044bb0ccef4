"""Orbax checkpointing for training: async saves, retention, safe resume, resharded restore.

A training checkpoint is one Orbax step directory `<workdir>/checkpoints/<step>/` holding three items:

* `params`: the model parameters (a plain Orbax pytree, so `--init_from` and the converter of the
  published RecurrentGemma checkpoints share one format: see `save_params` / `load_params`);
* `state`: everything else the train step carries (optimizer state, step counter, RNG key);
* `meta`: JSON with the step, the data position, the full config, and the shape, dtype and checksum
  of every array (`integrity.py`), so a checkpoint explains and verifies itself.

Safety rests on Orbax's atomic commit: a step is written under a temporary name and renamed (or, on
object stores, marked with a commit file) only once every host has finished, so a save interrupted
by SIGKILL or preemption never shows up as a step. Restoring reads `meta` first (the caller compares
it with the requested run before any array is read), then the arrays, then verifies their checksums.
Failures are told apart: damaged files (missing items, garbled metadata, TensorStore DATA_LOSS /
NOT_FOUND, a checksum mismatch) move the step to `<dir>_corrupt/` and the previous step is used; a
request that does not match raises `CheckpointMismatch` with nothing moved; any other read error is
retried with backoff and then raised as `StorageError`, again with nothing moved.

Arrays are restored straight into the shardings of the abstract target handed to `restore`, so a
checkpoint written on 8 devices restores onto 4 or 1 (or another mesh shape) without a detour
through host memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, NamedTuple

from absl import logging
import jax
import orbax.checkpoint as ocp
from etils import epath

from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import workdir as workdir_lib
from recurrentgemma_tpu.checkpoints import integrity as integrity_lib

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


class Restored(NamedTuple):
  """What `CheckpointManager.restore` returns."""

  step: int
  params: PyTree
  state: PyTree
  meta: dict[str, Any]


class CheckpointDamaged(Exception):
  """A committed step's files are missing, unreadable or fail their checksums (real damage)."""

  def __init__(self, step: int, reason: str):
    super().__init__(f"checkpoint step {step} is damaged: {reason}")
    self.step, self.reason = step, reason


class CheckpointMismatch(ValueError):
  """The checkpoint holds arrays of other shapes or dtypes than requested (a user error, not damage)."""

  exit_code = exit_codes.USER_ERROR
  traceback = False


class StorageError(RuntimeError):
  """Reading a checkpoint kept failing for a reason that does not show damage (nothing was moved)."""

  exit_code = exit_codes.INTERNAL
  traceback = False  # the message names the step and the storage error


class SaveFailed(RuntimeError):
  """An (asynchronous) checkpoint save failed; the steps committed before it are intact."""

  exit_code = exit_codes.INTERNAL
  traceback = False


# Status codes (TensorStore / gRPC) and exception types that mean the files themselves are bad. Anything
# else (UNAVAILABLE, DEADLINE_EXCEEDED, permission errors, unknown errors) is retried and then reported,
# never quarantined: moving a good step aside because the storage hiccuped would lose work.
_DAMAGE_CODES = ("DATA_LOSS", "NOT_FOUND")
_DAMAGE_TYPES = (CheckpointDamaged, json.JSONDecodeError, FileNotFoundError, KeyError)


def is_damage(error: BaseException) -> bool:
  """True when `error` (from reading a step) means missing or corrupt files."""
  if isinstance(error, _DAMAGE_TYPES):
    return True
  text = str(error)
  return any(text.startswith(code) or f" {code}:" in text for code in _DAMAGE_CODES)


class CheckpointManager:
  """Saves and restores training checkpoints under one directory (all processes call every method).

  Args:
    directory: the checkpoint directory (`<workdir>/checkpoints`).
    options: retention and async settings.
    read_attempts: reads of a step that fail are retried this many times in all, with a doubling
      pause starting at `retry_pause_s`, before the failure is classified.
    checksums: write per-array checksums and verify them on restore (False only to measure their cost).
  """

  def __init__(self, directory: str | os.PathLike[str], options: CheckpointOptions, *,
               read_attempts: int = 4, retry_pause_s: float = 1.0, checksums: bool = True):
    self.directory = epath.Path(directory)
    self.checksums = checksums
    self.options = options
    self.read_attempts = read_attempts
    self.retry_pause_s = retry_pause_s
    self._pending_save: int | None = None
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

  @property
  def quarantine_dir(self) -> epath.Path:
    """Where damaged steps are moved (`<directory>_corrupt`)."""
    return self.directory.parent / f"{self.directory.name}_{_CORRUPT_DIR}"

  # ---------------------------------------------------------------- saving

  def save(self, step: int, params: PyTree, state: PyTree, meta: Mapping[str, Any]) -> bool:
    """Starts saving `step` (asynchronously when configured); False if that step already exists.

    The arrays are copied to host before this returns, so the caller may donate them to the next
    step. `meta` gains the step, the time, and the shape, dtype and checksum of every array.
    """
    if step in self._manager.all_steps():
      return False
    self.check_save()  # a failure of the previous save stops here, not one save later
    trees = {PARAMS_ITEM: params, STATE_ITEM: state}
    meta = dict(meta, step=int(step), saved_at=time.time(), arrays=integrity_lib.array_specs(trees))
    if self.checksums:
      meta["checksums"] = integrity_lib.checksums(trees)
    try:
      started = self._manager.save(
          step,
          args=ocp.args.Composite(**{
              PARAMS_ITEM: ocp.args.StandardSave(params),
              STATE_ITEM: ocp.args.StandardSave(state),
              META_ITEM: ocp.args.JsonSave(meta),
          }),
          force=True,
      )
    except Exception as e:  # pylint: disable=broad-except
      raise SaveFailed(f"Saving checkpoint step {step} to {self.directory} failed: "
                       f"{_one_line(e)}") from e
    if started:
      self._pending_save = step
    return started

  def check_save(self) -> None:
    """Raises SaveFailed if the last asynchronous save has failed (cheap; call at every step)."""
    if self._pending_save is None or self._manager.is_saving_in_progress():
      return
    self.wait_until_finished()

  def wait_until_finished(self) -> None:
    """Blocks until the last async save is committed; raises SaveFailed naming the step if it failed."""
    step, self._pending_save = self._pending_save, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise SaveFailed(f"Saving checkpoint step {step} to {self.directory} failed: "
                       f"{_one_line(e)}") from e

  def close(self) -> None:
    """Finishes pending saves and releases Orbax's threads (raises SaveFailed if the save failed)."""
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()

  # ---------------------------------------------------------------- restoring

  def read_meta(self, step: int) -> dict[str, Any]:
    """The `meta` item of `step` alone (no array is read); raises CheckpointDamaged if unreadable."""
    def read():
      _check_step_metadata(self.directory / str(step))
      out = self._manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
      meta = out[META_ITEM]
      if not isinstance(meta, dict) or meta.get("step", step) != step:
        raise CheckpointDamaged(step, f"its meta item is not this step's: {str(meta)[:200]}")
      return dict(meta)
    return self._with_retries(step, "meta", read)

  def restore(self, step: int, abstract_params: PyTree, abstract_state: PyTree,
              meta: Mapping[str, Any] | None = None) -> Restored:
    """Restores `step` onto the shardings of the abstract (ShapeDtypeStruct) targets, verified.

    Raises CheckpointMismatch when the stored arrays have other shapes or dtypes than the targets
    (checked from `meta` before any array is read), CheckpointDamaged when files are missing or a
    checksum differs, and StorageError when reading kept failing for another reason.
    """
    meta = dict(self.read_meta(step) if meta is None else meta)
    trees = {PARAMS_ITEM: abstract_params, STATE_ITEM: abstract_state}
    if "arrays" in meta:
      _check_specs(self.directory / str(step), meta["arrays"], integrity_lib.array_specs(trees))

    def read():
      out = self._manager.restore(step, args=ocp.args.Composite(**{
          PARAMS_ITEM: ocp.args.StandardRestore(abstract_params),
          STATE_ITEM: ocp.args.StandardRestore(abstract_state),
      }))
      restored = {PARAMS_ITEM: out[PARAMS_ITEM], STATE_ITEM: out[STATE_ITEM]}
      if not self.checksums:
        pass
      elif "checksums" in meta:
        bad = integrity_lib.mismatches(meta["checksums"], integrity_lib.checksums(restored))
        if bad:
          raise CheckpointDamaged(step, f"checksum mismatch in array {', '.join(bad[:5])}"
                                        + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
      else:
        logging.warning("Checkpoint step %d has no checksums (written by an older version); its "
                        "arrays are not verified.", step)
      return restored

    out = self._with_retries(step, "arrays", read)
    return Restored(step=step, params=out[PARAMS_ITEM], state=out[STATE_ITEM], meta=meta)

  def restore_latest(self, abstract_params: PyTree, abstract_state: PyTree,
                     check: Callable[[dict[str, Any]], None] | None = None) -> Restored | None:
    """Restores the newest intact step; damaged newer steps are quarantined with a warning.

    `check(meta)` runs on the newest step's metadata before any array is read; whatever it raises
    (a refused resume) propagates with nothing moved. Returns None when the directory holds no
    committed step. Raises CheckpointDamaged when every step is damaged (after quarantining them):
    a workdir that held checkpoints is never silently restarted from step 0.
    """
    steps = self.all_steps()
    checked = False
    for step in reversed(steps):
      try:
        meta = self.read_meta(step)
        if check is not None and not checked:
          check(meta)
          checked = True
        return self.restore(step, abstract_params, abstract_state, meta)
      except CheckpointDamaged as e:
        logging.warning("Checkpoint step %d in %s is damaged (%s); falling back to the previous step.",
                        step, self.directory, e.reason)
        self.quarantine(step)
    if steps:
      raise CheckpointDamaged(steps[0], (
          f"every checkpoint in {self.directory} (steps {steps}) is damaged; they were moved to "
          f"{self.quarantine_dir}. Nothing is restarted from step 0 here: inspect them (see "
          "docs/training.md, 'Recovering a quarantined step'), or train in another workdir."))
    return None

  def _with_retries(self, step: int, what: str, fn: Callable[[], Any]) -> Any:
    pause = self.retry_pause_s
    for attempt in range(1, self.read_attempts + 1):
      try:
        return fn()
      except CheckpointMismatch:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if attempt == self.read_attempts:
          if is_damage(e):
            if isinstance(e, CheckpointDamaged):
              raise
            raise CheckpointDamaged(step, f"reading its {what} failed: {_one_line(e)}") from e
          raise StorageError(
              f"Reading checkpoint step {step} ({what}) in {self.directory} failed {attempt} times: "
              f"{_one_line(e)}. Nothing was moved; this does not look like damaged files (if it is, "
              "move the step aside by hand: docs/training.md).") from e
        logging.warning("Reading checkpoint step %d (%s) failed (attempt %d of %d, retrying in %.1f s): %s",
                        step, what, attempt, self.read_attempts, pause, _one_line(e))
        time.sleep(pause)
        pause *= 2

  def quarantine(self, step: int) -> None:
    """Moves a damaged step out of Orbax's view, so it is not retried and its number can be reused."""
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dst = self.quarantine_dir / f"{step}.{int(time.time())}"
      dst.parent.mkdir(parents=True, exist_ok=True)
      workdir_lib.move(src, dst)  # shutil.move locally; object copies + delete on a bucket
      logging.warning("Moved damaged checkpoint %s to %s.", src, dst)
    _sync_processes(f"quarantine_{step}")
    self._manager.reload()


def _check_step_metadata(step_dir: epath.Path) -> None:
  """Orbax ignores a garbled `_CHECKPOINT_METADATA` and missing items; both mean a damaged step."""
  step = int(step_dir.name)
  path = step_dir / "_CHECKPOINT_METADATA"
  if path.exists():
    try:
      if not isinstance(json.loads(path.read_text()), dict):
        raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
      raise CheckpointDamaged(step, f"{path} is not valid JSON ({e})") from e
  missing = [item for item in _ITEMS if not (step_dir / item).is_dir()]
  if missing:
    raise CheckpointDamaged(step, f"items {missing} are missing from {step_dir}")


def _check_specs(step_dir: epath.Path, saved: Mapping[str, Any], requested: Mapping[str, Any]) -> None:
  changed = [f"{p}: saved {_spec(saved.get(p))}, requested {_spec(requested.get(p))}"
             for p in sorted(set(saved) | set(requested)) if saved.get(p) != requested.get(p)]
  if changed:
    more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
    raise CheckpointMismatch(
        f"The checkpoint {step_dir} holds other arrays than this model/optimizer needs: "
        f"{'; '.join(changed[:8])}{more}. Nothing was moved.")


def _spec(spec: Any) -> str:
  return "absent" if spec is None else f"{tuple(spec[0])} {spec[1]}"


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:400]}"


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
  path = epath.Path(path) if workdir_lib.is_remote(path) else epath.Path(path).absolute()
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
