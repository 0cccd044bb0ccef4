"""events.py against TensorFlow: the event files it writes are read back by TensorFlow's own reader
and hold exactly the records `tf.summary.write` writes for the same scalars."""

import os

import pytest

from recurrentgemma_tpu import events

tf = pytest.importorskip("tensorflow")

SCALARS = {1: {"train/loss": 7.38, "train/grad_norm": 3.9}, 2: {"train/loss": 1e-9},
           2**40 + 3: {"eval/perplexity": 561.4, "downstream/task é/acc": float("nan")}}


def _read(directory):
  (name,) = os.listdir(directory)
  assert name.startswith("events.out.tfevents.") and name.endswith(".v2")
  return list(tf.compat.v1.train.summary_iterator(os.path.join(directory, name)))


def _tensorflow_events(directory):
  """What the TensorFlow writer writes: a float32 scalar tagged for the scalars plugin."""
  from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
  metadata = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")).SerializeToString()
  writer = tf.summary.create_file_writer(str(directory))
  for step, values in SCALARS.items():
    with writer.as_default(step=step):
      for tag, value in values.items():
        tf.summary.write(tag, tf.constant(value, tf.float32), metadata=metadata)
  writer.close()
  return _read(directory)


def test_events_equal_tensorflow_s_records_for_the_same_scalars(tmp_path):
  writer = events.EventWriter(str(tmp_path / "ours"))
  assert not (tmp_path / "ours").exists()  # nothing before the first write
  for step, values in SCALARS.items():
    writer.scalars(step, values)
  writer.close()
  ours, theirs = _read(tmp_path / "ours"), _tensorflow_events(tmp_path / "theirs")
  assert ours[0].file_version == theirs[0].file_version == "brain.Event:2"
  # TensorFlow writes one event per value; ours holds a step's values in one event.
  ours_values = [(e.step, v) for e in ours[1:] for v in e.summary.value]
  theirs_values = [(e.step, v) for e in theirs[1:] for v in e.summary.value]
  assert len(ours_values) == len(theirs_values) == 5
  for (step, a), (step_tf, b) in zip(ours_values, theirs_values):
    assert step == step_tf and a.tag == b.tag
    assert a.metadata == b.metadata
    assert a.tensor == b.tensor  # the same protobuf: dtype, shape (a scalar), value (NaN too)
  for e in ours:
    assert abs(e.wall_time - theirs[0].wall_time) < 60


def test_two_writers_of_one_process_write_two_files_and_a_killed_one_leaves_whole_records(tmp_path):
  first, second = events.EventWriter(str(tmp_path)), events.EventWriter(str(tmp_path))
  first.scalars(1, {"a": 1.0})
  second.scalars(1, {"a": 2.0})
  first.scalars(2, {"a": 3.0})  # no flush or close: a process killed here
  names = sorted(os.listdir(tmp_path))
  assert len(names) == 2
  by_file = {name: [(e.step, tf.make_ndarray(v.tensor).item())
                    for e in tf.compat.v1.train.summary_iterator(str(tmp_path / name))
                    for v in e.summary.value] for name in names}
  assert sorted(by_file.values()) == [[(1, 1.0), (2, 3.0)], [(1, 2.0)]]
