"""TensorBoard event files written through etils.epath: local folders and gs:// alike.

clu's default TensorBoard writer goes through `tf.summary`, whose GCS filesystem is
TensorFlow's own (no endpoint override: the emulator tests cannot reach it, and it is a
second GCS client beside epath's gcsfs and tensorstore). `EventWriter` needs no
TensorFlow: it builds the same protos `tf.summary` writes (TF2 tensor summaries:
scalars, PNG images, histograms, text, hparams), frames them as TFRecords, and writes
them with `epath.Path.write_bytes`.

An object store has no append, so every write is one complete new file,
`events.out.tfevents.<unix time>.<host>.<pid>.<n>` (n counts this process's files),
holding what was buffered since the
previous one (TensorBoard reads all event files of a folder, in name order). A file is
written at a report (`write_scalars`) once `flush_secs` have passed since the last
(the first report at once), at `flush()` and `close()`, and at exit for what is still
buffered. A failed write is logged and retried at the next one, not raised: TensorBoard
events never stop a run. A kill loses at most the last `flush_secs` of events, as with
`tf.summary` (which flushes every 120 s).
"""

import io
import itertools
import os
import socket
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from clu.metric_writers import interface
from etils import epath
from PIL import Image
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.histogram import summary_v2 as histogram_summary
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer import record_writer
from tensorboard.util import tensor_util

FILE_VERSION = "brain.Event:2"
# Numbers the files of this process, whichever writer writes them: two writers of one
# process in one folder (a run, then its resumption) never pick the same name.
_FILE_NUMBERS = itertools.count()


def encode_png(image: np.ndarray) -> bytes:
  """[H, W, C] uint8 (C = 1, 3 or 4) -> PNG bytes."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = (np.clip(image.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
  return buf.getvalue()


def image_summary(tag: str, images: np.ndarray) -> summary_pb2.Summary:
  """What `tf.summary.image` writes: a string tensor [width, height, png, png, ...]."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  content = [str(images.shape[2]).encode(), str(images.shape[1]).encode()]
  content += [encode_png(x) for x in images]
  summary = summary_pb2.Summary()
  summary.value.add(
    tag=tag,
    metadata=image_metadata.create_summary_metadata(display_name=None, description=None),
    tensor=tensor_util.make_tensor_proto(np.array(content, dtype=object)),
  )
  return summary


class _Pending:
  """The events not yet in a file, and where the next file goes (shared with the finalizer,
  so that what is buffered is written when the writer is collected or at exit)."""

  def __init__(self, logdir: str):
    self.logdir = epath.Path(logdir)
    self.events: list[bytes] = []  # serialized Event protos
    self.lock = threading.Lock()
    self.last_write = -float("inf")
    self.host = socket.gethostname()

  def add(self, event: event_pb2.Event) -> None:
    with self.lock:
      self.events.append(event.SerializeToString())

  def write(self) -> epath.Path | None:
    """Writes the buffered events as one new file; None if there were none (or it failed)."""
    with self.lock:
      if not self.events:
        return None
      now = time.time()
      head = event_pb2.Event(wall_time=now, file_version=FILE_VERSION).SerializeToString()
      buf = io.BytesIO()
      records = record_writer.RecordWriter(buf)
      for data in [head] + self.events:
        records.write(data)
      name = f"events.out.tfevents.{int(now)}.{self.host}.{os.getpid()}.{next(_FILE_NUMBERS):06d}"
      path = self.logdir / name
      try:
        self.logdir.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
      except Exception as e:  # pylint: disable=broad-except
        logging.warning(
          "TensorBoard events: could not write %s (%s: %s); %d events kept for the next write.",
          path,
          type(e).__name__,
          str(e)[:300],
          len(self.events),
        )
        return None
      self.events, self.last_write = [], time.monotonic()
      return path


class EventWriter(interface.MetricWriter):
  """A clu MetricWriter of TensorBoard event files in `logdir` (local or gs://), via epath."""

  def __init__(self, logdir: str, flush_secs: float = 60.0):
    self._pending = _Pending(logdir)
    self._flush_secs = flush_secs
    self._finalizer = weakref.finalize(self, _Pending.write, self._pending)

  @property
  def logdir(self) -> epath.Path:
    return self._pending.logdir

  def _add(self, step: int, summary: summary_pb2.Summary) -> None:
    self._pending.add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def write_summaries(
    self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
  ) -> None:
    summary = summary_pb2.Summary()
    for tag, value in values.items():
      md = (metadata or {}).get(tag)
      if isinstance(md, bytes):
        md = summary_pb2.SummaryMetadata.FromString(md)
      summary.value.add(
        tag=tag,
        tensor=tensor_util.make_tensor_proto(np.asarray(value)),
        **({"metadata": md} if md is not None else {}),
      )
    self._add(step, summary)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    summary = summary_pb2.Summary()
    for tag, value in scalars.items():
      summary.MergeFrom(scalar_summary.scalar_pb(tag, np.asarray(value)))
    self._add(step, summary)
    if time.monotonic() - self._pending.last_write >= self._flush_secs:
      self._pending.write()  # a report: into a file, at most every flush_secs

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    for tag, value in images.items():
      self._add(step, image_summary(tag, value))

  def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
    logging.log_first_n(logging.WARNING, "EventWriter does not write videos.", 1)

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
    logging.log_first_n(logging.WARNING, "EventWriter does not write audio.", 1)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for tag, value in texts.items():
      self._add(step, text_summary.text_pb(tag, value))

  def write_histograms(
    self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None
  ) -> None:
    for tag, value in arrays.items():
      buckets = (num_buckets or {}).get(tag)
      self._add(step, histogram_summary.histogram_pb(tag, np.asarray(value), buckets=buckets))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    from clu.internal import utils  # pylint: disable=g-import-not-at-top

    flat = {
      k: v if isinstance(v, (bool, int, float, str)) else str(v)
      for k, v in utils.flatten_dict(hparams)
    }
    self._add(0, hparams_summary.hparams_pb(flat))

  def flush(self) -> None:
    self._pending.write()

  def close(self) -> None:
    self._finalizer()  # writes what is buffered, once
