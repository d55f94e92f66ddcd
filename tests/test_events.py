"""beit_jax.training.events: TensorBoard event files through epath, read back by
TensorBoard's reader."""

import numpy as np
import pytest
import tensorflow as tf
from etils import epath
from tensorboard.backend.event_processing import event_accumulator

from beit_jax.training import events
from beit_jax.training import loop


def _accumulator(logdir):
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
  acc.Reload()
  return acc


def _scalars(acc, tag):
  return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


def _files(logdir):
  return sorted(p.name for p in epath.Path(logdir).iterdir() if "tfevents" in p.name)


def test_scalars_images_text_histograms_read_back(tmp_path):
  writer = events.EventWriter(str(tmp_path))
  writer.write_scalars(1, {"loss": 2.5, "lr": np.float32(1e-3)})  # first report: a file at once
  assert len(_files(tmp_path)) == 1
  picture = np.zeros((1, 5, 7, 3), np.uint8)
  picture[0, 1, 2] = (255, 0, 128)
  writer.write_images(1, {"mim": picture})
  writer.write_texts(1, {"note": "hello"})
  writer.write_histograms(1, {"w": np.arange(10.0)})
  writer.write_scalars(3, {"loss": 1.5})  # within flush_secs: buffered
  assert len(_files(tmp_path)) == 1
  writer.flush()
  assert len(_files(tmp_path)) == 2
  writer.close()
  acc = _accumulator(tmp_path)
  assert _scalars(acc, "loss") == [(1, 2.5), (3, 1.5)]
  assert _scalars(acc, "lr") == [(1, pytest.approx(1e-3))]
  assert acc.SummaryMetadata("loss").plugin_data.plugin_name == "scalars"
  assert acc.SummaryMetadata("mim").plugin_data.plugin_name == "images"
  (image,) = acc.Tensors("mim")
  width, height, png = tf.make_ndarray(image.tensor_proto)
  assert (int(width), int(height)) == (7, 5)
  np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), picture[0])
  assert tf.make_ndarray(acc.Tensors("note")[0].tensor_proto).item() == b"hello"
  assert acc.SummaryMetadata("w").plugin_data.plugin_name == "histograms"


def test_each_write_is_a_new_complete_file_in_name_order(tmp_path):
  writer = events.EventWriter(str(tmp_path), flush_secs=0)  # a file at every report
  for step in range(1, 13):
    writer.write_scalars(step, {"loss": float(step)})
  writer.close()
  names = _files(tmp_path)
  assert len(names) == 12
  assert [s for s, _ in _scalars(_accumulator(tmp_path), "loss")] == list(range(1, 13))
  # Every file is a whole TFRecord stream of its own (nothing is appended later).
  for name in names:
    records = list(tf.data.TFRecordDataset(str(tmp_path / name)))
    assert len(records) == 2  # file_version + one report


def test_what_is_buffered_is_written_at_close_once(tmp_path):
  writer = events.EventWriter(str(tmp_path), flush_secs=1e9)
  writer.write_scalars(1, {"loss": 1.0})
  writer.write_scalars(2, {"loss": 0.5})
  writer.close()
  writer.close()
  assert len(_files(tmp_path)) == 2
  assert [s for s, _ in _scalars(_accumulator(tmp_path), "loss")] == [1, 2]


def test_a_failed_write_is_logged_and_retried(tmp_path, monkeypatch):
  writer = events.EventWriter(str(tmp_path), flush_secs=1e9)
  real = epath.Path.write_bytes
  calls = []

  def flaky(self, data):
    calls.append(self)
    if len(calls) == 1:
      raise OSError("503 Service Unavailable")
    return real(self, data)

  monkeypatch.setattr(epath.Path, "write_bytes", flaky)
  writer.write_scalars(1, {"loss": 1.0})  # the write fails: kept
  assert _files(tmp_path) == []
  writer.write_scalars(2, {"loss": 0.5})
  writer.flush()
  assert len(calls) == 2 and len(_files(tmp_path)) == 1
  assert [s for s, _ in _scalars(_accumulator(tmp_path), "loss")] == [1, 2]


def test_make_writer_writes_events_and_a_resumed_run_adds_files(tmp_path):
  for steps in ((2, 4), (6,)):  # a run, then its resumption in the same workdir
    writer = loop.make_writer(str(tmp_path))
    for step in steps:
      writer.write_scalars(step, {"loss": 1.0 / step})
    writer.flush()
  assert [s for s, _ in _scalars(_accumulator(tmp_path), "loss")] == [2, 4, 6]
