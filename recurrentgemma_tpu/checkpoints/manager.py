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
it with the requested run before any array is read), then each item's arrays, then verifies their
checksums. This module reads and reports; which step to use, and when a step that does not read is
moved to `<dir>_corrupt/`, is decided by the resume policy (`resume.py`). A read that fails is
retried with backoff until it succeeds, fails the same way twice in a row, or runs out of attempts;
a failed verification (checksum, metadata) is not retried. Either way the step is reported as
`StepUnreadable` naming the file and the error, and nothing is moved here.

Arrays are restored straight into the shardings of the abstract target handed to `restore`, so a
checkpoint written on 8 devices restores onto 4 or 1 (or another mesh shape) without a detour
through host memory.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import re
import sys
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
PARAMS_ITEM = workdir_lib.PARAMS_ITEM
STATE_ITEM = "state"
META_ITEM = "meta"
_ITEMS = (PARAMS_ITEM, STATE_ITEM, META_ITEM)

# Where unreadable steps are moved so they are neither retried nor overwritten.
_CORRUPT_DIR = "corrupt"
# Where steps of a trajectory abandoned by a loss-spike rollback are moved (spikes.py).
_ROLLED_BACK_DIR = "rolled_back"


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
  """A step's files read but fail verification (checksums, metadata): not worth reading again."""

  def __init__(self, step: int, reason: str, path: str = ""):
    super().__init__(f"checkpoint step {step} is damaged: {reason}")
    self.step, self.reason, self.path = step, reason, path


class StepUnreadable(Exception):
  """One step could not be read (after the retries of `CheckpointManager._read`); nothing was moved.

  Attributes:
    step: the step.
    path: the file or item directory the failure points at.
    error: the error, in one line.
    persistent: True when the same failure repeated (or verification failed): a step that fails
      like this while an older one restores is damaged. False when every attempt failed differently
      (storage that comes and goes): such a step is never judged.
    reads: how many times the failing item was read.
  """

  def __init__(self, step: int, path: str, error: str, *, persistent: bool, reads: int):
    super().__init__(f"step {step}: {path}: {error}")
    self.step, self.path, self.error = step, path, error
    self.persistent, self.reads = persistent, reads


class CheckpointMismatch(ValueError):
  """The checkpoint holds arrays of other shapes or dtypes than requested (a user error, not damage).

  `params_fit` tells whether the parameters alone still fit (then `--init_from` can use them).
  """

  def __init__(self, message: str, params_fit: bool = False):
    super().__init__(message)
    self.params_fit = params_fit

  exit_code = exit_codes.USER_ERROR
  traceback = False


class StorageError(RuntimeError):
  """No checkpoint step could be read (storage down, or every step damaged); nothing was moved."""

  exit_code = exit_codes.INTERNAL
  traceback = False  # the message names the step and the storage error


class SaveFailed(RuntimeError):
  """An (asynchronous) checkpoint save failed; the steps committed before it are intact."""

  exit_code = exit_codes.INTERNAL
  traceback = False


class CheckpointManager:
  """Saves and restores training checkpoints under one directory (all processes call every method).

  Args:
    directory: the checkpoint directory (`<workdir>/checkpoints`).
    options: retention and async settings.
    read_attempts: a read that keeps failing in new ways is tried at most this many times in all,
      with a doubling pause starting at `retry_pause_s`; one that fails the same way twice in a row
      is given up at once (at most one extra read of a damaged item).
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
      # Orbax removes the leftovers of interrupted saves in a thread that it waits for only before
      # its first save. A run that ends without saving (refused at start-up) would otherwise exit
      # with that thread running, and its failure at interpreter shutdown would print a traceback
      # after the run's one error line. Removing leftovers is best effort (the next start tries
      # again), so its failure (e.g. a failed save's files still being written) is only logged.
      cleanup = getattr(self._manager, "_cleanup_tmp_directory_future", None)
      if cleanup is not None:
        try:
          cleanup.result()
        except Exception as e:  # pylint: disable=broad-except
          logging.info("Removing leftovers of interrupted saves in %s failed: %s", self.directory,
                       _one_line(e))
      self._manager.close()

  # ---------------------------------------------------------------- restoring

  def read_meta(self, step: int) -> dict[str, Any]:
    """The `meta` item of `step` alone (no array is read); raises StepUnreadable if it does not read."""
    step_dir = self.directory / str(step)

    def read():
      _check_step_metadata(step_dir)
      meta = _read_alone(ocp.JsonCheckpointHandler, step_dir / META_ITEM, ocp.args.JsonRestore())
      if not isinstance(meta, dict) or meta.get("step", step) != step:
        raise CheckpointDamaged(step, f"its meta item is not this step's: {str(meta)[:200]}",
                                os.fspath(step_dir / META_ITEM))
      return dict(meta)

    return self._read(step, META_ITEM, read)

  def restore(self, step: int, abstract_params: PyTree, abstract_state: PyTree,
              meta: Mapping[str, Any] | None = None) -> Restored:
    """Restores `step` onto the shardings of the abstract (ShapeDtypeStruct) targets, verified.

    Raises CheckpointMismatch when the stored arrays have other shapes or dtypes than the targets
    (checked from `meta` before any array is read) and StepUnreadable when an item does not read or
    fails its checksums. Items are read one at a time, so a damaged `params` costs no read of `state`.
    """
    meta = dict(self.read_meta(step) if meta is None else meta)
    trees = {PARAMS_ITEM: abstract_params, STATE_ITEM: abstract_state}
    if "arrays" in meta:
      _check_specs(self.directory / str(step), meta["arrays"], integrity_lib.array_specs(trees))
    if self.checksums and "checksums" not in meta:
      logging.warning("Checkpoint step %d has no checksums (written by an older version); its "
                      "arrays are not verified.", step)
    out = {}
    for item, target in trees.items():
      item_dir = self.directory / str(step) / item
      read = functools.partial(_read_alone, ocp.StandardCheckpointHandler, item_dir,
                               ocp.args.StandardRestore(target))
      out[item] = self._read(step, item, read, functools.partial(self._verify, step, item, meta))
    return Restored(step=step, params=out[PARAMS_ITEM], state=out[STATE_ITEM], meta=meta)

  def _verify(self, step: int, item: str, meta: Mapping[str, Any], restored: PyTree) -> None:
    """Checks a read array item against the checksums in `meta` (a computation across processes,
    so it runs only once every process has read its shards; all raise CheckpointDamaged alike)."""
    if not (self.checksums and "checksums" in meta):
      return
    expected = {p: c for p, c in meta["checksums"].items() if p.startswith(f"{item}/")}
    bad = integrity_lib.mismatches(expected, integrity_lib.checksums({item: restored}))
    if bad:
      raise CheckpointDamaged(
          step, f"checksum mismatch in array {', '.join(bad[:5])}"
          + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""),
          os.fspath(self.directory / str(step) / item))

  def _read(self, step: int, item: str, fn: Callable[[], Any],
            verify: Callable[[Any], None] | None = None) -> Any:
    """Runs `fn` (one read of `item` of `step`, by this process alone) until it succeeds on every
    process, then `verify` on the result; else raises StepUnreadable.

    A failed verification (CheckpointDamaged) is final at once; any other error is read again after
    a pause, and given up when it repeats (`_signature`: the same error up to numbers and quoted
    names), so a damaged file costs one extra read, or after `read_attempts` reads of errors that
    keep changing. All processes take each decision together; no collective runs between a read and
    that decision (one host's read may fail while another's succeeds).
    """
    item_dir = self.directory / str(step) / item
    pause, previous = self.retry_pause_s, None
    for attempt in range(1, self.read_attempts + 1):
      result, error, persistent = None, None, False
      try:
        result = fn()
      except CheckpointMismatch:
        raise
      except CheckpointDamaged as e:
        error, persistent = e, True
      except Exception as e:  # pylint: disable=broad-except
        error, persistent = e, _signature(e) == previous
      ok = error is None
      if not ok:
        _drop_leftovers_of_failed_reads()
      all_ok, stop, all_persistent = _all_processes(
          ok, ok or persistent or attempt == self.read_attempts, ok or persistent)
      if all_ok:
        try:
          if verify is not None:
            verify(result)
        except CheckpointDamaged as e:  # raised by every process alike
          raise StepUnreadable(step, *_describe(item_dir, e), persistent=True, reads=attempt) from e
        return result
      path, text = _describe(item_dir, error)
      if stop:
        raise StepUnreadable(step, path, text, persistent=all_persistent, reads=attempt)
      # INFO: a blip is routine; a failure that stays gets its one warning line from the policy.
      logging.info("Reading checkpoint step %d (%s) failed (read %d of at most %d; again in %.1f s): %s",
                   step, item, attempt, self.read_attempts, pause, text)
      previous = _signature(error) if error else None
      time.sleep(pause)
      pause *= 2
    raise AssertionError("unreachable: the last attempt always stops")

  def quarantine(self, step: int) -> epath.Path:
    """Moves a step out of Orbax's view (never deletes it); returns where it went."""
    return self.set_aside(step, self.quarantine_dir)

  @property
  def rolled_back_dir(self) -> epath.Path:
    """Where steps after a loss-spike rollback's restored step are moved (`<directory>_rolled_back`)."""
    return self.directory.parent / f"{self.directory.name}_{_ROLLED_BACK_DIR}"

  def set_aside(self, step: int, into: epath.Path) -> epath.Path:
    """Moves a step into directory `into` (never deletes it); returns where it went."""
    dst = into / f"{step}.{int(time.time())}"
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dst.parent.mkdir(parents=True, exist_ok=True)
      workdir_lib.move(src, dst)  # shutil.move locally; object copies + delete on a bucket
    _sync_processes(f"quarantine_{step}")
    self._manager.reload()
    return dst


def _check_step_metadata(step_dir: epath.Path) -> None:
  """Orbax ignores a garbled `_CHECKPOINT_METADATA` and missing items; both mean a damaged step."""
  step = int(step_dir.name)
  path = step_dir / "_CHECKPOINT_METADATA"
  if path.exists():
    try:
      text = path.read_text()
    except OSError as e:  # name the file: epath's read errors do not
      raise OSError(e.errno, e.strerror, os.fspath(path)) from e
    try:
      if not isinstance(json.loads(text), dict):
        raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
      raise CheckpointDamaged(step, f"not valid JSON ({_one_line(e)})", os.fspath(path)) from e
  missing = [item for item in _ITEMS if not (step_dir / item).is_dir()]
  if missing:
    raise CheckpointDamaged(step, f"items {missing} are missing", os.fspath(step_dir))


# JSON files Orbax keeps beside an item's arrays (and the meta item's one file): where a decode error
# comes from, since the JSON and Unicode errors themselves name no file.
_JSON_FILES = ("_METADATA", "_sharding", "metadata", "array_metadatas")


def _describe(item_dir: epath.Path, error: BaseException | None) -> tuple[str, str]:
  """(file, one-line error) of a failed read of the item in `item_dir` (None: another process's)."""
  if error is None:
    return os.fspath(item_dir), "the read failed on another process"
  if isinstance(error, CheckpointDamaged):
    return error.path or os.fspath(item_dir), error.reason
  return _locate(item_dir, error), _one_line(error)


def _locate(item_dir: epath.Path, error: BaseException) -> str:
  """The file a read error points at: its own file name, an unparsable JSON file, else the item."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.filename:
      return os.fspath(e.filename)
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
      for name in _JSON_FILES:
        for path in ([item_dir / name] if name != "array_metadatas"
                     else sorted((item_dir / name).glob("*")) if (item_dir / name).is_dir() else []):
          try:
            if path.is_file():
              json.loads(path.read_text())
          except (ValueError, UnicodeDecodeError, OSError):
            return os.fspath(path)
  return os.fspath(item_dir)


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and its causes (and contexts), outermost first, without repeats."""
  out: list[BaseException] = []
  while error is not None and error not in out:
    out.append(error)
    error = error.__cause__ or error.__context__
  return out


def _check_specs(step_dir: epath.Path, saved: Mapping[str, Any], requested: Mapping[str, Any]) -> None:
  changed = [p for p in sorted(set(saved) | set(requested)) if saved.get(p) != requested.get(p)]
  if changed:
    more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
    listed = "; ".join(f"{p}: saved {_spec(saved.get(p))}, requested {_spec(requested.get(p))}"
                       for p in changed[:8])
    raise CheckpointMismatch(
        f"The checkpoint {step_dir} holds other arrays than this model/optimizer needs: "
        f"{listed}{more}. Nothing was moved.",
        params_fit=not any(p.startswith(f"{PARAMS_ITEM}/") for p in changed))


def _spec(spec: Any) -> str:
  return "absent" if spec is None else f"{tuple(spec[0])} {spec[1]}"


def _chosen(error: BaseException) -> tuple[str, str]:
  """(type name, whole message in one line) of the most telling exception in `error`'s chain: a
  TensorStore status (e.g. `OUT_OF_RANGE: ...`) is preferred over Orbax's wrapper exception, whose
  text is a dump of the TensorStore spec (cut off, as is the spec TensorStore appends)."""
  chain = [e for e in _chain(error) if not isinstance(e, StopIteration)] or [error]
  coded = [e for e in chain if re.match(r"[A-Z][A-Z_]+: ", str(e))]
  chosen = coded[0] if coded else chain[0]
  return type(chosen).__name__, " ".join(str(chosen).split()).split(" [tensorstore_spec", 1)[0]


def _one_line(error: BaseException, limit: int = 1500) -> str:
  """`Type: message` in one line. A longer message keeps its start and its end: TensorStore nests
  its errors, and the innermost one, last, names the file that failed."""
  name, text = _chosen(error)
  if len(text) > limit:
    text = f"{text[:limit // 3]} ... {text[-(2 * limit) // 3:]}"
  return f"{name}: {text}"


def _signature(error: BaseException) -> str:
  """What makes two failures "the same way": the whole error without its numbers and quoted names
  (the chunk TensorStore reports first varies between reads of one damaged file)."""
  name, text = _chosen(error)
  return name + ": " + re.sub(r"\d+", "#", re.sub(r'"[^"]*"', '""', text))


def _drop_leftovers_of_failed_reads() -> None:
  """Keeps a failed read to its one line. When one chunk of an Orbax restore fails, TensorStore still
  completes the others: their callbacks find Orbax's event loop closed, and the abandoned coroutines
  raise when collected. Python prints each as an "Exception ignored" traceback (pages of TensorStore
  specs) though nothing happened beyond the failure already reported. This drops exactly those two
  kinds and hands every other unraisable exception to the hook that was there before."""
  if getattr(sys.unraisablehook, "_drops_failed_read_leftovers", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable: Any) -> None:
    exc, obj = unraisable.exc_value, unraisable.object
    closed_loop = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
    orbax_coroutine = (inspect.iscoroutine(obj)
                       and f"{os.sep}orbax{os.sep}" in obj.cr_code.co_filename)
    if not (closed_loop or orbax_coroutine):
      previous(unraisable)

  hook._drops_failed_read_leftovers = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def _read_alone(handler_type: type[Any], item_dir: epath.Path, args: Any) -> Any:
  """Reads one item with a new Orbax handler of its type, with no barrier across processes after it
  (unlike CheckpointManager.restore): a process whose read raised would never reach that barrier,
  and the others would then wait in a different collective than its own (gloo aborts, TPU hosts
  hang). `_read` takes the decision with every process after each read instead."""
  handler = handler_type()
  try:
    return handler.restore(item_dir, args=args)
  finally:
    handler.close()


def _all_processes(*flags: bool) -> tuple[bool, ...]:
  """Each flag AND-ed over all processes, so every host takes the same decision."""
  if jax.process_count() == 1:
    return tuple(flags)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
  return tuple(bool(v) for v in np.asarray(gathered).reshape(-1, len(flags)).min(axis=0))


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
