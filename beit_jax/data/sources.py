"""Where images come from: TFDS, image folders (local or gs://) and the embedded sets.

A source is a fixed-length sequence of examples with ids 0..num_examples-1. Each example
is a payload (encoded bytes, or an index into images held in memory) that `decode_crop`
turns into pixels; labelled sources pair it with an int32 label. Epochs are deterministic
functions of (seed, epoch), which is what makes a resumed run see the batches of an
uninterrupted one:
  * indexable sources (embedded sets, folders) permute their ids statelessly, so a resume
    skips consumed examples for free;
  * TFDS reads its files in a seeded order through a seeded shuffle buffer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import ml_collections
import numpy as np
from etils import epy

# Loaded at first use, by a tf.data pipeline: the compute path imports this module without TF.
with epy.lazy_imports():
  import tensorflow as tf
  import tensorflow_datasets as tfds

from beit_jax.training import validate
from beit_jax.data import embedded
from beit_jax.data import ops
from beit_jax.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
EMBEDDED = ("embedded",) + tuple(f"embedded:{n}" for n in embedded.LABELLED)
LABELLED_DATASETS = "'embedded:digits', 'embedded:photos', 'tfds:NAME' or 'folder:PATH'"
# TFDS files read at once; with the shuffle buffer this mixes examples across files.
_FILE_CYCLE = 16
# Embedded photos are shrunk to about ImageNet's resolution (mean ~400x350): crops of the
# 1411x1411 retina would make colour jitter several times slower than on ImageNet.
_EMBEDDED_MAX_SIDE = 512
# Salt of the epoch-order stream (the example stream is the batching's).
ORDER_SALT = 1


def _dataset(v) -> bool:
  return isinstance(v, str) and (
    v in EMBEDDED or (v.startswith(("tfds:", "folder:")) and len(v.partition(":")[2]) > 0)
  )


RULES = (
  ("input.dataset", _dataset, f"one of {EMBEDDED}, 'tfds:NAME' or 'folder:/path'"),
  (
    "input.eval_dataset",
    lambda v: v == "" or _dataset(v),
    "'' (the training data set) or a data set like input.dataset",
  ),
  (
    "input.eval_split",
    lambda v: isinstance(v, str) and len(v) > 0,
    "a split name, e.g. 'validation'",
  ),
  ("input.shuffle_buffer", *validate.POSITIVE_INT),
)


@dataclasses.dataclass(frozen=True)
class Shard:
  """This process's part of every epoch."""

  index: int
  count: int
  batch_size: int  # per process
  steps_per_epoch: int

  @property
  def epoch_length(self) -> int:
    return self.batch_size * self.steps_per_epoch


class Source(Protocol):
  """Examples with ids 0..num_examples-1; records are (id, payload)."""

  name: str  # the `input.dataset` value, for messages
  num_examples: int
  class_names: tuple[str, ...]  # labelled sources only

  def epoch(
    self, seed: tf.Tensor, epoch: tf.Tensor, start: tf.Tensor, shard: Shard
  ) -> tf.data.Dataset:
    """(id, payload) records of one epoch of `shard` from its position `start` on."""

  def in_order(self) -> tf.data.Dataset:
    """(id, payload) records in source order."""

  def decode_crop(self, image: tf.Tensor, window_fn) -> tf.Tensor:
    """An image payload -> uint8 [h, w, 3] of the window `window_fn(shape)` picks."""


class _Indexed:
  """Random access by id: an epoch is a stateless permutation, a resume costs nothing."""

  name: str
  num_examples: int

  def load(self, example_id: tf.Tensor):
    raise NotImplementedError

  def epoch(self, seed, epoch, start, shard):
    order_seed = ops.fold(seed, ORDER_SALT, epoch)
    global_batch = shard.batch_size * shard.count

    def example_id(position):
      # Step s of the epoch takes permuted positions [s*B, (s+1)*B) and process p its p-th
      # slice, so the global batch does not depend on the number of processes.
      step, row = position // shard.batch_size, position % shard.batch_size
      position = step * global_batch + shard.index * shard.batch_size + row
      return tf.random.experimental.index_shuffle(
        position, order_seed, tf.constant(self.num_examples - 1, tf.int64)
      )

    ids = tf.data.Dataset.range(start, shard.epoch_length).map(ops.graph_only(example_id))
    return ids.map(ops.graph_only(lambda i: (i, self.load(i))), num_parallel_calls=tf.data.AUTOTUNE)

  def in_order(self):
    return tf.data.Dataset.range(self.num_examples).map(ops.graph_only(lambda i: (i, self.load(i))))

  def decode_crop(self, image, window_fn):
    return ops.decode_crop(image, window_fn)


class ArraySource(_Indexed):
  """uint8 images held in memory (the embedded sets); example id -> image id % count."""

  def __init__(
    self,
    name: str,
    images,
    num_examples: int | None = None,
    labels=None,
    class_names: tuple[str, ...] = (),
  ):
    self.name, self._count = name, len(images)
    self.num_examples = self._count if num_examples is None else num_examples
    self.class_names = class_names
    # Eager constants are captured by reference in the tf.data functions.
    self._pixels = tf.constant(np.concatenate([x.reshape(-1) for x in images]))  # uint8 [T]
    self._offsets = tf.constant(np.cumsum([0] + [x.size for x in images]), tf.int64)
    self._shapes = tf.constant([x.shape[:2] for x in images], tf.int32)  # [n, 2]
    self._labels = None if labels is None else tf.constant(labels, tf.int32)

  def load(self, example_id):
    index = example_id % self._count
    return index if self._labels is None else (index, tf.gather(self._labels, index))

  def decode_crop(self, image, window_fn):
    shape = self._shapes[image]
    pixels = tf.reshape(
      self._pixels[self._offsets[image] : self._offsets[image + 1]], [shape[0], shape[1], 3]
    )
    return ops.crop(pixels, window_fn(shape))


def load_labelled(name: str, split: str, field: str):
  """`embedded.load_labelled`, its errors (and an empty slice) as ConfigErrors of `field`."""
  try:
    images, labels, class_names = embedded.load_labelled(name, split)
  except ValueError as e:
    raise ConfigError(f"{field} of embedded:{name}: {e}") from None
  if not images:
    raise ConfigError(f"{field} {split!r} of embedded:{name} holds no images")
  return images, labels, class_names


class FolderSource(_Indexed):
  """Image files under a directory (local or gs://); labelled by class subfolder."""

  def __init__(self, root: str, labelled: bool = False):
    self.name = f"folder:{root}"
    paths, labels, self.class_names = list_image_folder(root)
    if labelled:
      loose = sum(1 for label in labels if label < 0)
      if loose or not self.class_names:
        raise ConfigError(
          f"input.dataset='folder:{root}': classification needs one subfolder "
          f"per class; {loose} image files lie directly in {root}"
        )
    self.num_examples = len(paths)
    self._paths = tf.constant(paths)
    self._labels = tf.constant(labels, tf.int32) if labelled else None

  def load(self, example_id):
    # Read outside the per-example map: a file that cannot be read is an error, not a skip.
    data = tf.io.read_file(tf.gather(self._paths, example_id))
    return data if self._labels is None else (data, tf.gather(self._labels, example_id))


@functools.lru_cache(maxsize=16)
def list_image_folder(root: str) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
  """Image files under `root`, recursively, in sorted order, with class labels.

  The class of a file is its top-level subfolder (sorted names -> 0, 1, ...), for fine-tuning
  on folders laid out like ImageNet's; files directly in `root` get label -1.

  Returns:
    (paths, labels, class_names).
  """
  field = f"input.dataset='folder:{root}'"
  if not tf.io.gfile.isdir(root):
    raise ConfigError(f"{field}: {root} is not a directory")
  prefix = root.rstrip("/") + "/"
  paths = sorted(
    f"{dirpath.rstrip('/')}/{name}"
    for dirpath, _, names in tf.io.gfile.walk(root)
    for name in names
    if name.lower().endswith(IMAGE_EXTENSIONS)
  )
  if not paths:
    raise ConfigError(f"{field}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
  tops = [p[len(prefix) :].split("/")[0] if "/" in p[len(prefix) :] else None for p in paths]
  class_names = tuple(sorted({t for t in tops if t is not None}))
  index = {name: i for i, name in enumerate(class_names)}
  return tuple(paths), tuple(index.get(t, -1) for t in tops), class_names


class TfdsSource:
  """A prepared TFDS dataset (TFRecord files), read without decoding the images."""

  def __init__(
    self, name: str, split: str, data_dir: str | None, shuffle_buffer: int, labelled: bool = False
  ):
    self.name = f"tfds:{name}"
    field = f"input.dataset={self.name!r}"
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
      raise ConfigError(
        f"{field}: TFDS knows no dataset {name!r} (not registered, nothing "
        f"prepared in input.data_dir={data_dir})"
      ) from None
    root = builder.data_dir_root
    if not builder.is_prepared():
      how = f"run `tfds build {name} --data_dir={root}`"
      if name.split("/")[0].split(":")[0] == "imagenet2012":
        how = (
          f"download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into "
          f"{root}/downloads/manual/, then {how}"
        )
      raise ConfigError(f"{field} is not prepared in input.data_dir={root}: {how}")
    info = builder.info
    if "image" not in info.features:
      raise ConfigError(f"{field} has no 'image' feature (features: {list(info.features)})")
    if info.file_format != tfds.core.FileFormat.TFRECORD:
      raise ConfigError(
        f"{field} is stored as {info.file_format.value}; this pipeline reads "
        f"tfrecord: rebuild with `tfds build {name} --file_format=tfrecord`"
      )
    try:
      split_info = info.splits[split]
    except (KeyError, ValueError):
      raise ConfigError(
        f"input.split={split!r} is not a split of {name}; available: {sorted(info.splits)}"
      ) from None
    self.class_names: tuple[str, ...] = ()
    self._labelled = labelled
    if labelled:
      label = info.features["label"] if "label" in info.features else None
      if not isinstance(label, tfds.features.ClassLabel):
        raise ConfigError(
          f"input.dataset='tfds:{name}' has no ClassLabel feature 'label' "
          f"(features: {list(info.features)})"
        )
      self.class_names = tuple(label.names)
    self.num_examples = split_info.num_examples
    self._features = info.features
    self._buffer = shuffle_buffer
    # (file, records to skip, records to read, id of the first one read)
    self._instructions, first = [], 0
    for ins in split_info.file_instructions:
      self._instructions.append((ins.filename, ins.skip, ins.take, first))
      first += ins.take

  def _shard_instructions(self, shard: Shard) -> list[tuple[str, int, int, int]]:
    """The contiguous ids [i*n/P, (i+1)*n/P) of process i, as file instructions."""
    per_process = self.num_examples // shard.count
    lo, hi = shard.index * per_process, (shard.index + 1) * per_process
    out = []
    for filename, skip, take, first in self._instructions:
      a, b = max(lo, first), min(hi, first + take)
      if a < b:
        out.append((filename, skip + a - first, b - a, a))
    return out

  def _payload(self, example_id, record):
    example = self._features.deserialize_example(
      record, decoders={"image": tfds.decode.SkipDecoding()}
    )
    if self._labelled:
      return example_id, (example["image"], tf.cast(example["label"], tf.int32))
    return example_id, example["image"]

  def epoch(self, seed, epoch, start, shard):
    instructions = self._shard_instructions(shard)
    files, skips, takes, firsts = _instruction_tensors(instructions)
    file_seed, buffer_seed = ops.split(ops.fold(seed, ORDER_SALT, epoch), 2)
    order = tf.random.experimental.stateless_shuffle(tf.range(tf.size(files)), file_seed)

    def read(k):
      records = tf.data.TFRecordDataset(files[k]).skip(skips[k]).take(takes[k])
      return records.enumerate(firsts[k])

    records = tf.data.Dataset.from_tensor_slices(order).interleave(
      read,
      cycle_length=min(_FILE_CYCLE, len(instructions)),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )
    records = records.shuffle(
      self._buffer,
      reshuffle_each_iteration=False,
      seed=tf.random.stateless_uniform([], buffer_seed, minval=None, maxval=None, dtype=tf.int64),
    )
    return (
      records.take(shard.epoch_length)
      .skip(start)
      .map(self._payload, num_parallel_calls=tf.data.AUTOTUNE)
    )

  def in_order(self):
    files, skips, takes, firsts = _instruction_tensors(self._instructions)
    return (
      tf.data.Dataset.range(len(self._instructions))
      .flat_map(
        ops.graph_only(
          lambda k: (
            tf.data.TFRecordDataset(files[k]).skip(skips[k]).take(takes[k]).enumerate(firsts[k])
          )
        )
      )
      .map(self._payload)
    )

  def decode_crop(self, image, window_fn):
    return ops.decode_crop(image, window_fn)


def _instruction_tensors(instructions) -> tuple[tf.Tensor, ...]:
  files, skips, takes, firsts = zip(*instructions)
  return (
    tf.constant(files),
    tf.constant(skips, tf.int64),
    tf.constant(takes, tf.int64),
    tf.constant(firsts, tf.int64),
  )


def _get(cfg: ml_collections.ConfigDict, name: str):
  if name not in cfg:
    raise ConfigError(f"input.{name} is missing from the config")
  return cfg[name]


def make_source(cfg: ml_collections.ConfigDict) -> Source:
  """The unlabelled training source `input.dataset` names (labelled sets: their images)."""
  dataset = _get(cfg, "dataset")
  kind, sep, arg = dataset.partition(":") if isinstance(dataset, str) else ("", "", "")
  if dataset == "embedded":  # random crops of the bundled photos; id -> photo id % 20
    return ArraySource(
      "embedded",
      embedded.load_embedded_images(max_side=_EMBEDDED_MAX_SIDE),
      _get(cfg, "embedded_epoch_size"),
    )
  if kind == "embedded" and arg in embedded.LABELLED:  # its images, labels unused
    return ArraySource(dataset, load_labelled(arg, _get(cfg, "split"), "input.split")[0])
  if sep and arg and kind == "folder":
    return FolderSource(arg)
  if sep and arg and kind == "tfds":
    return TfdsSource(arg, _get(cfg, "split"), _get(cfg, "data_dir"), _get(cfg, "shuffle_buffer"))
  raise ConfigError(
    f"input.dataset must be 'embedded', {EMBEDDED[1:]}, 'tfds:NAME' or "
    f"'folder:PATH', got {dataset!r}"
  )


def make_labelled_source(cfg: ml_collections.ConfigDict, *, train: bool) -> Source:
  """The training (`input.dataset`, `input.split`) or validation (`input.eval_dataset` or
  the same set, `input.eval_split`) images with their labels."""
  field = "input.dataset" if train or not cfg.get("eval_dataset") else "input.eval_dataset"
  dataset = cfg.dataset if field == "input.dataset" else cfg.eval_dataset
  split = cfg.split if train else cfg.get("eval_split", "validation")
  kind, sep, arg = dataset.partition(":") if isinstance(dataset, str) else ("", "", "")
  if kind == "embedded" and arg in embedded.LABELLED:
    images, labels, class_names = load_labelled(arg, split, "input split")
    return ArraySource(f"embedded:{arg}", images, labels=labels, class_names=class_names)
  if sep and arg and kind == "folder":
    return FolderSource(arg, labelled=True)
  if sep and arg and kind == "tfds":
    return TfdsSource(arg, split, cfg.get("data_dir"), _get(cfg, "shuffle_buffer"), labelled=True)
  raise ConfigError(
    f"{field}={dataset!r} is not a labelled data set; accepted: {LABELLED_DATASETS}"
  )
