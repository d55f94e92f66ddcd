"""Resumable, process-sharded batching with refill of undecodable images.

Records are cut into groups of one batch before decoding, and each example's randomness is
seeded by (seed, epoch, id, round), so a batch depends on its group only: a run resumed at
step k sees exactly the batches an uninterrupted run sees, and resuming skips whole epochs
and the consumed records of the current one before anything is decoded. An image that fails
to decode is dropped and counted on the iterator; its slot is filled with a new augmentation
of another image of the same group (refill rounds), so a bad file never shifts later batches.
Nothing here touches jax or devices.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator

import numpy as np
from absl import logging
from etils import epy

# Loaded at first use, by a tf.data pipeline: the compute path imports this module without TF.
with epy.lazy_imports():
  import tensorflow as tf

from beit_jax.data import ops
from beit_jax.data import sources
from beit_jax.errors import ConfigError

# A batch is refilled from its own decodable images in up to this many rounds, so it survives
# up to 7 undecodable images in 8; more than that means the data is broken.
MAX_ROUNDS = 8
# Salt of the per-example stream (the epoch order is the sources').
EXAMPLE_SALT = 2

# (seed, payload, decode_crop) -> dict of tensors: one training example.
ExampleFn = Callable[["tf.Tensor", "tf.Tensor", ops.DecodeCrop], dict]


def base_seed(seed: int) -> tf.Tensor:
  return tf.constant([seed, 0], tf.int64)


def options() -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True
  return opts


def hide_accelerators() -> None:
  """TF must leave GPUs to jax (TPUs are invisible to TF anyway)."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF was initialised before: only harmful if it saw a GPU
    if tf.config.get_visible_devices("GPU"):
      logging.warning(
        "TensorFlow already initialised and sees GPUs: %s", tf.config.get_visible_devices("GPU")
      )


def one_batch(examples: tf.data.Dataset, n: int) -> tf.data.Dataset:
  """Exactly one element: a batch of the first n examples, shorter (even empty) if fewer."""
  batched = examples.take(n).batch(n)
  empty = tf.nest.map_structure(
    lambda s: tf.zeros([0, *s.shape[1:]], s.dtype), batched.element_spec
  )
  return batched.concatenate(tf.data.Dataset.from_tensors(empty)).take(1)


class BatchIterator(Iterator[dict[str, np.ndarray]]):
  """This process's batches as dicts of NumPy arrays.

  Attributes:
    last_ids: int64 [b] example ids of the last batch (refilled slots repeat an id).
  """

  def __init__(self, ds: tf.data.Dataset, batch_size: int, source_name: str):
    self._iterator = ds.as_numpy_iterator()
    self._batch_size, self._source_name = batch_size, source_name
    self._skipped = collections.Counter(undecodable=0)
    self.last_ids: np.ndarray | None = None

  def skipped_counts(self) -> dict[str, int]:
    """Examples this iterator dropped, by reason ('undecodable': their slots were refilled)."""
    return dict(self._skipped)

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self.last_ids, fresh = batch.pop("_id"), batch.pop("_fresh")
    if len(fresh) < self._batch_size:
      raise ConfigError(
        f"input.dataset={self._source_name!r}: only {len(fresh)} of {self._batch_size} images "
        f"of a batch could be decoded and augmented, even in {MAX_ROUNDS} refill rounds; is "
        f"it image data?"
      )
    self._skipped["undecodable"] += int(np.sum(~fresh))
    return batch


def make_iterator(
  source: sources.Source,
  example_fn: ExampleFn,
  *,
  batch_size: int,
  seed: int,
  start_step: int,
  process_index: int,
  process_count: int,
) -> BatchIterator:
  """Batches of `example_fn(seed, payload, source.decode_crop)` over `source`.

  `batch_size` is the global batch; this process gets its 1/process_count of it.
  """
  hide_accelerators()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  if batch_size % process_count:
    raise ConfigError(
      f"input.batch_size={batch_size} must be divisible by the number of "
      f"processes ({process_count})"
    )
  steps_per_epoch = source.num_examples // batch_size
  if steps_per_epoch == 0:
    raise ConfigError(
      f"input.batch_size={batch_size} is larger than input.dataset="
      f"{source.name!r} ({source.num_examples} examples)"
    )
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  shard = sources.Shard(process_index, process_count, batch_size // process_count, steps_per_epoch)
  start_epoch, start_batch = divmod(start_step, steps_per_epoch)
  base = base_seed(seed)
  b = shard.batch_size

  def epoch_groups(epoch):  # raw records of one epoch, one batch per element
    start = tf.cast(epoch == start_epoch, tf.int64) * (start_batch * b)
    records = source.epoch(base, epoch, start, shard).batch(b, drop_remainder=True)
    return records.map(
      ops.graph_only(lambda ids, payloads: {"epoch": epoch, "id": ids, "payload": payloads})
    )

  def group_batch(group):  # decode and augment one group into exactly one batch
    def round_examples(round_):
      def one(example_id, payload):
        example = example_fn(
          ops.fold(base, EXAMPLE_SALT, group["epoch"], example_id, round_),
          payload,
          source.decode_crop,
        )
        return {**example, "_id": example_id, "_fresh": tf.equal(round_, 0)}

      examples = tf.data.Dataset.from_tensor_slices((group["id"], group["payload"]))
      return examples.map(
        one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
      ).ignore_errors()

    return one_batch(tf.data.Dataset.range(MAX_ROUNDS).flat_map(round_examples), b)

  ds = tf.data.Dataset.counter(start_epoch).flat_map(ops.graph_only(epoch_groups))
  # Two groups in flight so the tail of one batch overlaps the head of the next.
  ds = ds.interleave(group_batch, cycle_length=2, num_parallel_calls=2, deterministic=True)
  ds = ds.prefetch(2).with_options(options())
  return BatchIterator(ds, b, source.name)
