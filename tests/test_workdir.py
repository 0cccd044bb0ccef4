"""Workdir file operations on a local directory and on a remote URL.

The remote case runs offline on TensorFlow's in-memory filesystem (`ram://`), reached through the
same etils.epath class and TensorFlow backend that serve `gs://` (see `ram_scheme`): only the scheme
differs, so this checks the trainer never turns a URL into a local path (`os.path.abspath` would
make `gs://b/run` into `<cwd>/gs:/b/run`) and never uses `open`/`os.replace` on one.
"""

import json
import os

from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from etils.epath import register
import numpy as np
import pytest

from recurrentgemma_tpu import cli
from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import heartbeat
from recurrentgemma_tpu import metrics
from recurrentgemma_tpu import trainer
from recurrentgemma_tpu import workdir as workdir_lib


class _RamBackend(type(epath_backend.tf_backend)):
  """TensorFlow's backend, with one fix for ram://: opening for "w" replaces the file.

  TensorFlow's RamFileSystem appends to an existing file opened for writing; a bucket (and a local
  file) replaces it, and the heartbeat, config.json and the metrics truncation rely on that.
  """

  def open(self, path, mode):
    if "w" in mode and self.gfile.exists(path):
      self.gfile.remove(path)
    return super().open(path, mode)


@pytest.fixture
def ram_scheme(monkeypatch):
  """Makes epath serve `ram://` like `gs://` (PosixGPath on the TensorFlow backend)."""
  monkeypatch.setattr(gpath, "_URI_PREFIXES", gpath._URI_PREFIXES + ("ram://",))
  monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"})
  monkeypatch.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
  # _GPath._backend returns tf_backend for every URL scheme when TensorFlow is installed (gs://
  # included); for ram:// it returns the ram-fixed subclass instead.
  ram_backend = _RamBackend()
  real_backend = gpath._GPath._backend
  monkeypatch.setattr(gpath._GPath, "_backend", property(
      lambda self: ram_backend if self._uri_scheme == "ram" else real_backend.fget(self)))
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "ram", ram_backend)
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "ram://", gpath.PosixGPath)
  p = epath.Path("ram://probe/x")
  assert p._backend is ram_backend
  assert epath.Path("gs://probe/x")._backend is epath_backend.tf_backend  # what gs:// gets
  assert os.fspath(p) == "ram://probe/x"


class _Exp:
  def to_json(self):
    return json.dumps({"train": {"steps": 4}})


def _exercise(workdir):
  """The trainer's own workdir I/O, in the order a run does it; returns the prepared workdir."""
  workdir = workdir_lib.prepare(workdir)
  trainer._write_config(workdir, _Exp())
  beat = heartbeat.Heartbeat(workdir, 0)
  beat.beat("starting", 0)
  writer = metrics.MetricsWriter(workdir, total_steps=4, enabled=True)
  writer.start(0)
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0 / step})
  writer.write(3, {"loss": 0.5}, prefix="eval")
  writer.flush()
  writer.close()
  beat.beat("training", 3, step_time=0.25)
  return workdir


def _listing(workdir):
  return sorted(workdir_lib.listdir(workdir))


def _check_outputs(workdir):
  assert json.loads(workdir_lib.read_text(workdir_lib.join(workdir, "config.json"))) == {
      "train": {"steps": 4}}
  assert [r["step"] for r in metrics.read_metrics(workdir, "train")] == [1, 2, 3]
  assert metrics.read_metrics(workdir, "train")[1]["loss"] == 0.5
  text = workdir_lib.read_text(workdir_lib.join(workdir, "metrics.jsonl"))
  assert workdir_lib.final_evaluation(text, 3) == {"step": 3, "split": "eval", "loss": 0.5}
  assert workdir_lib.final_evaluation(text, 4) is None and not workdir_lib.is_complete(text, 4)
  beat = heartbeat.read(workdir, 0)
  assert (beat["phase"], beat["step"], beat["step_time"], beat["pid"]) == ("training", 3, 0.25, os.getpid())
  assert _listing(workdir) == ["config.json", "heartbeat", "metrics.jsonl", "tensorboard"]
  assert workdir_lib.listdir(workdir_lib.join(workdir, "heartbeat")) == ["process_0.json"]
  events = workdir_lib.listdir(workdir_lib.join(workdir, "tensorboard"))
  assert len(events) == 1 and events[0].startswith("events.out.tfevents.")
  # Read back by TensorFlow's reader (through its file layer for a remote workdir).
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  logged = [(e.step, v.tag, tf.make_ndarray(v.tensor)) for e in tf.compat.v1.train.summary_iterator(
      workdir_lib.join(workdir, "tensorboard", events[0])) for v in e.summary.value]
  assert logged == [(1, "train/loss", np.float32(1.0)), (2, "train/loss", np.float32(0.5)),
                    (3, "train/loss", np.float32(1 / 3)), (3, "eval/loss", np.float32(0.5))]


def test_local_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  workdir = _exercise("run")
  assert workdir == str(tmp_path / "run")  # made absolute, as before
  _check_outputs(workdir)
  # Resuming at step 2 drops the records past it (rewritten atomically, no tmp file left).
  writer = metrics.MetricsWriter(workdir, total_steps=4, enabled=True)
  writer.start(2)
  writer.close()
  assert [r["step"] for r in metrics.read_metrics(workdir, "train")] == [1, 2]
  assert metrics.read_metrics(workdir, "eval") == []
  assert not [n for n in os.listdir(workdir) if "tmp" in n]


def test_local_workdir_errors(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(exit_codes.UserError, match="is a file"):
    workdir_lib.prepare(str(tmp_path / "file"))
  with pytest.raises(exit_codes.UserError, match="not a writable directory"):
    workdir_lib.prepare(str(tmp_path / "file" / "below"))


def test_remote_workdir(ram_scheme, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  workdir = _exercise("ram://bucket/run/")
  assert workdir == "ram://bucket/run"  # kept a URL: no abspath
  assert not os.listdir(tmp_path)  # nothing landed on the local disk (e.g. ./ram:/bucket/run)
  _check_outputs(workdir)
  assert workdir_lib.join(workdir, "checkpoints") == "ram://bucket/run/checkpoints"
  writer = metrics.MetricsWriter(workdir, total_steps=4, enabled=True)
  writer.start(2)
  writer.write(3, {"loss": 0.75})  # appended after the truncation
  writer.close()
  assert [(r["step"], r["loss"]) for r in metrics.read_metrics(workdir, "train")] == [
      (1, 1.0), (2, 0.5), (3, 0.75)]
  assert cli.workdir_state(workdir, 4) == "fresh start"
  epath.Path(workdir_lib.join(workdir, "checkpoints", "3", "params")).mkdir(parents=True)
  assert cli.workdir_state(workdir, 4) == (
      "newest checkpoint step 3; checked against this config before resuming")
  assert not os.listdir(tmp_path)


def test_remote_file_is_refused(ram_scheme):
  epath.Path("ram://bucket2/").mkdir(parents=True, exist_ok=True)
  epath.Path("ram://bucket2/afile").write_text("x")
  with pytest.raises(exit_codes.UserError, match="is a file"):
    workdir_lib.prepare("ram://bucket2/afile")


def test_remote_move_tree(ram_scheme):
  """Quarantining a damaged step moves a directory tree; ram:// (like GCS) has no directory rename."""
  src = "ram://bucket3/checkpoints/5"
  for name, text in (("_CHECKPOINT_METADATA", "{}"), ("params/a", "1"), ("params/sub/b", "2")):
    p = epath.Path(src) / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
  dst = "ram://bucket3/checkpoints_corrupt/5.123"
  workdir_lib.move(src, dst)
  assert not workdir_lib.exists(src)
  assert "5" not in workdir_lib.listdir("ram://bucket3/checkpoints")
  assert workdir_lib.read_text(dst + "/params/sub/b") == "2"
  assert workdir_lib.read_text(dst + "/_CHECKPOINT_METADATA") == "{}"
  assert sorted(workdir_lib.listdir(dst)) == ["_CHECKPOINT_METADATA", "params"]
