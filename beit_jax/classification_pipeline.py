"""tf.data pipelines of labelled images for fine-tuning and linear probing (SPEC §5).

The sources, resumable epochs, sharding, refill of undecodable images and stateless seeding
are those of `input_pipeline` (training batches are a deterministic function of (seed, step));
this module adds labels, the fine-tuning augmentation and a padded, sharded evaluation pass.

Data sets (`input.dataset`, and `input.eval_dataset` if the validation images live elsewhere):
  * `tfds:NAME` with an `image` and a `label` feature, splits `input.split` / `input.eval_split`
    (e.g. `tfds:imagenet2012`, 'train' / 'validation');
  * `folder:PATH` with one subfolder per class (ImageNet's train/ and val/ layout: point
    `input.dataset` at train/ and `input.eval_dataset` at val/);
  * `embedded:digits` / `embedded:photos`: labelled sets inside scikit-learn / scikit-image
    (`embedded_data.load_labelled`), splits 'train' / 'validation' or slices such as
    'train[:10%]' (as TFDS splits: fine-tuning on a fraction of the labels).

Training example: RandomResizedCrop (bicubic) -> flip -> RandAugment (or colour jitter when
RandAugment is off, as timm) -> normalise -> random erasing. Mixup / CutMix and label
smoothing run on device in the train step. Evaluation: shorter side resized (bicubic) to
image_size / eval_crop_pct, centre crop.
"""
from collections.abc import Iterator
import dataclasses
import functools
import math

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from beit_jax import embedded_data
from beit_jax import input_pipeline as ip
from beit_jax import randaugment
from beit_jax.errors import ConfigError

# This module extends input_pipeline's sources and example functions (its private API).
# pylint: disable=protected-access

DATASETS = "'embedded:digits', 'embedded:photos', 'tfds:NAME' or 'folder:PATH'"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_train: int
  num_eval: int
  num_classes: int
  class_names: tuple[str, ...]


# --------------------------------------------------------------------------- sources
# Their records are (id, (payload, label)): the payload is what the parent's decode_crop
# reads, the label an int32 scalar.


class _ArraySource(ip._ArraySource):
  """A labelled embedded set, held in memory."""

  def __init__(self, name: str, split: str):
    images, labels, self.class_names = ip.load_labelled(name, split, "input split")
    super().__init__(f"embedded:{name}", images)
    self._labels = tf.constant(labels, tf.int32)

  def load(self, example_id):
    index = super().load(example_id)
    return index, tf.gather(self._labels, index)


class _FolderSource(ip._FolderSource):
  """Image files in one subfolder per class."""

  def __init__(self, root: str):
    super().__init__(root)
    _, labels, self.class_names = ip.list_image_folder(root)
    loose = sum(1 for label in labels if label < 0)
    if loose or not self.class_names:
      raise ConfigError(f"input.dataset='folder:{root}': classification needs one subfolder "
                        f"per class; {loose} image files lie directly in {root}")
    self._labels = tf.constant(labels, tf.int32)

  def load(self, example_id):
    return super().load(example_id), tf.gather(self._labels, example_id)


class _TfdsSource(ip._TfdsSource):
  """A prepared TFDS classification data set (features `image` and `label`)."""

  def __init__(self, name: str, split: str, data_dir: str | None, shuffle_buffer: int):
    super().__init__(name, split, data_dir, shuffle_buffer)
    label = self._features["label"] if "label" in self._features else None
    if not isinstance(label, tfds.features.ClassLabel):
      raise ConfigError(f"input.dataset='tfds:{name}' has no ClassLabel feature 'label' "
                        f"(features: {list(self._features)})")
    self.class_names = tuple(label.names)

  def _image_bytes(self, example_id, record):
    example = self._features.deserialize_example(
        record, decoders={"image": tfds.decode.SkipDecoding()})
    return example_id, (example["image"], tf.cast(example["label"], tf.int32))


def _make_source(cfg: ml_collections.ConfigDict, *, train: bool) -> ip._Source:
  field = "input.dataset" if train or not cfg.get("eval_dataset") else "input.eval_dataset"
  dataset = cfg.dataset if field == "input.dataset" else cfg.eval_dataset
  split = cfg.split if train else cfg.get("eval_split", "validation")
  kind, sep, arg = dataset.partition(":") if isinstance(dataset, str) else ("", "", "")
  if kind == "embedded" and arg in embedded_data.LABELLED:
    return _ArraySource(arg, split)
  if sep and arg and kind == "folder":
    return _FolderSource(arg)
  if sep and arg and kind == "tfds":
    return _TfdsSource(arg, split, cfg.get("data_dir"), ip._int_field(cfg, "shuffle_buffer"))
  raise ConfigError(f"{field}={dataset!r} is not a labelled data set; accepted: {DATASETS}")


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Sizes and classes of the training and validation data (they must share classes)."""
  train = _make_source(config.input, train=True)
  evaluation = _make_source(config.input, train=False)
  if train.class_names != evaluation.class_names:
    raise ConfigError(f"the training data ({train.name}, {len(train.class_names)} classes) and "
                      f"the validation data ({evaluation.name}, {len(evaluation.class_names)} "
                      "classes) do not have the same classes")
  return DatasetInfo(train.num_examples, evaluation.num_examples, len(train.class_names),
                     train.class_names)


# --------------------------------------------------------------------------- examples


@dataclasses.dataclass(frozen=True)
class _Views:
  image_size: int
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  flip: bool
  color_jitter: float  # only without RandAugment (timm ignores it then)
  randaugment: randaugment.Spec | None
  random_erase: float
  eval_resize: int  # shorter side before the centre crop


def _views_from_config(cfg: ml_collections.ConfigDict) -> _Views:
  augment = ip._augment_fields(cfg)
  image_size = ip._int_field(cfg, "image_size")
  erase = cfg.get("random_erase", 0.0)
  if isinstance(erase, bool) or not isinstance(erase, (int, float)) or not 0 <= erase <= 1:
    raise ConfigError(f"input.random_erase must be a probability in [0, 1], got {erase!r}")
  crop_pct = cfg.get("eval_crop_pct", 1.0)
  if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or \
      not 0 < crop_pct <= 1:
    raise ConfigError(f"input.eval_crop_pct must be in (0, 1], got {crop_pct!r}")
  return _Views(image_size=image_size, **augment,
                randaugment=randaugment.parse(cfg.get("randaugment", "")),
                random_erase=float(erase), eval_resize=int(image_size / crop_pct))


def _train_example(seed, payload, decode_crop, views: _Views) -> dict:
  image_payload, label = payload
  crop_seed, flip_seed, aug_seed, erase_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  crop = decode_crop(image_payload, functools.partial(
      ip._random_crop_window, seed=crop_seed, scale=views.crop_scale,
      ratio=views.crop_ratio))
  image = ip._resize(tf.image.convert_image_dtype(crop, tf.float32), views.image_size,
                     "bicubic")
  image, = ip._maybe_flip([image], flip_seed, views)
  if views.randaugment is not None:  # on uint8 values, as timm on PIL images
    image = randaugment.randaugment(tf.round(image * 255.0), aug_seed, views.randaugment) / 255.0
  elif views.color_jitter > 0:
    image = ip._color_jitter(image, views.color_jitter, aug_seed)
  image = (image - ip.IMAGENET_MEAN) / ip.IMAGENET_STD
  if views.random_erase > 0:
    image = randaugment.random_erasing(image, erase_seed, views.random_erase)
  return {"image": tf.ensure_shape(image, [views.image_size, views.image_size, 3]),
          "label": label}


def _eval_image(image_payload, decode_crop, views: _Views) -> tf.Tensor:
  """torchvision Resize(eval_resize, bicubic) + CenterCrop(image_size), normalised."""
  image = decode_crop(image_payload, lambda shape: tf.stack([0, 0, shape[0], shape[1]]))
  h, w = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
  short = tf.minimum(h, w)
  size = [tf.cast(tf.floor(views.eval_resize * h / short), tf.int32),
          tf.cast(tf.floor(views.eval_resize * w / short), tf.int32)]
  image = tf.image.resize(tf.image.convert_image_dtype(image, tf.float32), size,
                          method="bicubic", antialias=True)
  s = views.image_size
  top = tf.cast(tf.round((tf.cast(size[0], tf.float32) - s) / 2.0), tf.int32)
  left = tf.cast(tf.round((tf.cast(size[1], tf.float32) - s) / 2.0), tf.int32)
  image = tf.clip_by_value(image[top:top + s, left:left + s], 0.0, 1.0)
  return tf.ensure_shape((image - ip.IMAGENET_MEAN) / ip.IMAGENET_STD, [s, s, 3])


# --------------------------------------------------------------------------- iterators


def make_train_iterator(config: ml_collections.ConfigDict, *, seed: int, start_step: int = 0,
                        process_index: int = 0, process_count: int = 1) -> ip.BatchIterator:
  """Augmented training batches of this process from step `start_step` on.

  Returns:
    An endless iterator of dicts: `image` float32 [b, S, S, 3] (ImageNet-normalised),
    `label` int32 [b]; b = input.batch_size / process_count.
  """
  views = _views_from_config(config.input)
  return ip._make_iterator(
      config, _train_example, views, seed=seed, start_step=start_step,
      process_index=process_index, process_count=process_count,
      source=_make_source(config.input, train=True))


class EvalData:
  """The validation split as fixed-shape batches: this process's share, padded.

  Process p evaluates the examples with id % process_count == p; every process yields the
  same number of batches (padding has `valid` False), so a sharded eval step never waits.
  Undecodable images are dropped (they count in no metric: compare `val_examples`).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, process_index: int = 0,
               process_count: int = 1):
    ip._hide_accelerators()
    cfg = config.input
    self._views = _views_from_config(cfg)
    self._source = _make_source(cfg, train=False)
    batch = cfg.get("eval_batch_size") or cfg.batch_size
    if batch % process_count:
      raise ConfigError(f"input.eval_batch_size={batch} must be divisible by the number of "
                        f"processes ({process_count})")
    self.batch_size = batch // process_count
    self.num_examples = self._source.num_examples
    self._index, self._count = process_index, process_count
    self.num_batches = math.ceil(math.ceil(self.num_examples / process_count) / self.batch_size)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    """A fresh pass: dicts of `image` [b, S, S, 3], `label` int32 [b], `valid` bool [b]."""
    source, views, index, count = self._source, self._views, self._index, self._count
    records = source.in_order()
    if count > 1:
      records = records.filter(lambda i, _: i % count == index)

    def one(_, payload):
      image_payload, label = payload
      return {"image": _eval_image(image_payload, source.decode_crop, views),
              "label": label, "valid": tf.constant(True)}

    s = views.image_size
    padding = tf.data.Dataset.from_tensors(
        {"image": tf.zeros([s, s, 3]), "label": tf.constant(0, tf.int32),
         "valid": tf.constant(False)}).repeat()
    ds = records.map(one, num_parallel_calls=ip.AUTOTUNE, deterministic=True).ignore_errors()
    ds = ds.concatenate(padding).take(self.num_batches * self.batch_size)
    ds = ds.batch(self.batch_size).prefetch(2).with_options(ip._options())
    return ds.as_numpy_iterator()
