"""tf.data pipelines of labelled images for fine-tuning and linear probing.

Data sets (`input.dataset`, and `input.eval_dataset` if the validation images live elsewhere):
  * `tfds:NAME` with an `image` and a `label` feature, splits `input.split` / `input.eval_split`
    (e.g. `tfds:imagenet2012`, 'train' / 'validation');
  * `folder:PATH` with one subfolder per class (ImageNet's train/ and val/ layout: point
    `input.dataset` at train/ and `input.eval_dataset` at val/);
  * `embedded:digits` / `embedded:photos`: labelled sets inside scikit-learn / scikit-image,
    splits 'train' / 'validation' or slices such as 'train[:10%]' (as TFDS splits:
    fine-tuning on a fraction of the labels).

Training example: RandomResizedCrop (bicubic) -> flip -> RandAugment (or colour jitter when
RandAugment is off, as timm) -> normalise -> random erasing. Mixup / CutMix and label
smoothing run on device in the train step. Evaluation: shorter side resized (bicubic) to
image_size / eval_crop_pct, centre crop. Training batches resume like pretraining's.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import math

import ml_collections
import numpy as np
from etils import epy

# Loaded at first use, by a tf.data pipeline: the compute path imports this module without TF.
with epy.lazy_imports():
  import tensorflow as tf

from beit_jax.training import validate
from beit_jax.data import augment
from beit_jax.data import batching
from beit_jax.data import ops
from beit_jax.data import randaugment
from beit_jax.data import sources
from beit_jax.data.views import IMAGENET_MEAN, IMAGENET_STD
from beit_jax.errors import ConfigError

RULES = (
  sources.RULES
  + augment.RULES
  + (
    (
      "input.randaugment",
      lambda v: isinstance(v, str) and validate.accepted_by(randaugment.parse)(v),
      "'' (off) or a timm RandAugment string, e.g. 'rand-m9-mstd0.5-inc1'",
    ),
    ("input.random_erase", validate.number(0, 1), "a probability in [0, 1]"),
    ("input.eval_crop_pct", validate.number(0, 1, lo_open=True), "a number in (0, 1]"),
  )
)
CHECKS = augment.CHECKS


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_train: int
  num_eval: int
  num_classes: int
  class_names: tuple[str, ...]


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Sizes and classes of the training and validation data (they must share classes)."""
  train = sources.make_labelled_source(config.input, train=True)
  evaluation = sources.make_labelled_source(config.input, train=False)
  if train.class_names != evaluation.class_names:
    raise ConfigError(
      f"the training data ({train.name}, {len(train.class_names)} classes) and "
      f"the validation data ({evaluation.name}, {len(evaluation.class_names)} "
      "classes) do not have the same classes"
    )
  return DatasetInfo(
    train.num_examples, evaluation.num_examples, len(train.class_names), train.class_names
  )


@dataclasses.dataclass(frozen=True)
class _Recipe:
  image_size: int
  augment: augment.Augment
  randaugment: randaugment.Spec | None  # colour jitter only without it (timm ignores it then)
  random_erase: float
  eval_resize: int  # shorter side before the centre crop

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "_Recipe":
    cfg = config.input
    crop_pct = cfg.get("eval_crop_pct", 1.0)
    return cls(
      cfg.image_size,
      augment.Augment.from_config(cfg),
      randaugment.parse(cfg.get("randaugment", "")),
      float(cfg.get("random_erase", 0.0)),
      int(cfg.image_size / crop_pct),
    )


def _train_example(seed, payload, decode, recipe: _Recipe) -> dict:
  image_payload, label = payload
  crop_seed, flip_seed, aug_seed, erase_seed = ops.split(seed, 4)
  aug = recipe.augment
  image = ops.random_resized_crop(
    image_payload, decode, crop_seed, scale=aug.crop_scale, ratio=aug.crop_ratio
  )
  image = ops.resize(image, recipe.image_size, "bicubic")
  if aug.flip:
    image = ops.flip(image, flip_seed)
  if recipe.randaugment is not None:  # on uint8 values, as timm on PIL images
    image = randaugment.randaugment(tf.round(image * 255.0), aug_seed, recipe.randaugment) / 255.0
  elif aug.color_jitter > 0:
    image = ops.color_jitter(image, aug.color_jitter, aug_seed)
  image = ops.normalize(image, IMAGENET_MEAN, IMAGENET_STD)
  if recipe.random_erase > 0:
    image = randaugment.random_erasing(image, erase_seed, recipe.random_erase)
  return {
    "image": tf.ensure_shape(image, [recipe.image_size, recipe.image_size, 3]),
    "label": label,
  }


def _eval_image(image_payload, decode, recipe: _Recipe) -> tf.Tensor:
  """torchvision Resize(eval_resize, bicubic) + CenterCrop(image_size), normalised."""
  image = decode(image_payload, lambda shape: tf.stack([0, 0, shape[0], shape[1]]))
  h, w = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
  short = tf.minimum(h, w)
  size = [
    tf.cast(tf.floor(recipe.eval_resize * h / short), tf.int32),
    tf.cast(tf.floor(recipe.eval_resize * w / short), tf.int32),
  ]
  image = tf.image.resize(
    tf.image.convert_image_dtype(image, tf.float32), size, method="bicubic", antialias=True
  )
  s = recipe.image_size
  top = tf.cast(tf.round((tf.cast(size[0], tf.float32) - s) / 2.0), tf.int32)
  left = tf.cast(tf.round((tf.cast(size[1], tf.float32) - s) / 2.0), tf.int32)
  image = tf.clip_by_value(image[top : top + s, left : left + s], 0.0, 1.0)
  return tf.ensure_shape(ops.normalize(image, IMAGENET_MEAN, IMAGENET_STD), [s, s, 3])


def make_train_iterator(
  config: ml_collections.ConfigDict,
  *,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> batching.BatchIterator:
  """Augmented training batches of this process from step `start_step` on.

  Returns:
    An endless iterator of dicts: `image` float32 [b, S, S, 3] (ImageNet-normalised),
    `label` int32 [b]; b = input.batch_size / process_count.
  """
  recipe = _Recipe.from_config(config)
  return batching.make_iterator(
    sources.make_labelled_source(config.input, train=True),
    lambda seed, payload, decode: _train_example(seed, payload, decode, recipe),
    batch_size=config.input.batch_size,
    seed=seed,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
  )


class EvalData:
  """The validation split as fixed-shape batches: this process's share, padded.

  Process p evaluates the examples with id % process_count == p; every process yields the
  same number of batches (padding has `valid` False), so a sharded eval step never waits.
  Undecodable images are dropped (they count in no metric: compare `val_examples`).
  """

  def __init__(
    self, config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1
  ):
    batching.hide_accelerators()
    cfg = config.input
    self._recipe = _Recipe.from_config(config)
    self._source = sources.make_labelled_source(cfg, train=False)
    batch = cfg.get("eval_batch_size") or cfg.batch_size
    if batch % process_count:
      raise ConfigError(
        f"input.eval_batch_size={batch} must be divisible by the number of "
        f"processes ({process_count})"
      )
    self.batch_size = batch // process_count
    self.num_examples = self._source.num_examples
    self._index, self._count = process_index, process_count
    self.num_batches = math.ceil(math.ceil(self.num_examples / process_count) / self.batch_size)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    """A fresh pass: dicts of `image` [b, S, S, 3], `label` int32 [b], `valid` bool [b]."""
    source, recipe, index, count = self._source, self._recipe, self._index, self._count
    records = source.in_order()
    if count > 1:
      records = records.filter(lambda i, _: i % count == index)

    def one(_, payload):
      image_payload, label = payload
      return {
        "image": _eval_image(image_payload, source.decode_crop, recipe),
        "label": label,
        "valid": tf.constant(True),
      }

    s = recipe.image_size
    padding = tf.data.Dataset.from_tensors(
      {"image": tf.zeros([s, s, 3]), "label": tf.constant(0, tf.int32), "valid": tf.constant(False)}
    ).repeat()
    ds = records.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors().concatenate(padding).take(self.num_batches * self.batch_size)
    ds = ds.batch(self.batch_size).prefetch(2).with_options(batching.options())
    return ds.as_numpy_iterator()
