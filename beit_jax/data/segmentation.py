"""tf.data pipelines of (image, label map) pairs for semantic segmentation (mmseg's ADE20K).

Data sets (`input.dataset`, and `input.eval_dataset` if the validation pairs live elsewhere):
  * `tfds:NAME` with an `image` and an `annotation` feature whose first channel is the class
    (`tfds:scene_parse150`: splits 'train' and 'test', the latter ADE20K's validation images;
    its annotations are the Places 2017 instance masks, see configs/seg_ade20k_base.py);
  * `folder:ROOT` with `images/` and `annotations/`, an annotation `<stem>.png` (8-bit, one
    class per value) for every image `<stem>.jpg|png`, or `images/<split>/` and
    `annotations/<split>/` per split (ADEChallengeData2016: 'training' / 'validation');
  * `embedded:digits`: scikit-learn's digits pasted onto crops of the bundled photos, labelled
    per pixel (0 background, digit d -> d + 1: 11 classes); the validation images use the
    digits' validation split and the right-most third of each photo, so neither a digit nor
    a background pixel of it is seen in training.

`input.reduce_zero_label` is mmseg's: label 0 ("other" in ADE20K) becomes the ignore label
255 and the classes shift down by one. Training example (mmseg's pipeline): resize to
`input.scale` (long, short) times a ratio drawn from `input.ratio_range`, keeping the aspect
ratio; random crop of `input.image_size` (redrawn up to 10 times while one class covers
more than `input.cat_max_ratio` of it); flip; photometric distortion; normalise; pad with 0
(labels with 255). Validation: every image whole, resized to `input.scale` times each of
`input.eval_scales`, with its label at full size; the sliding windows run on device
(`beit_jax.evaluation.segmentation`). An image whose label does not fit (another size, a value
that is no class) is skipped and counted, in training as in evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import functools

import ml_collections
import numpy as np
from etils import epy
from PIL import Image

# Loaded at first use, by a tf.data pipeline: the compute path imports this module without TF.
with epy.lazy_imports():
  import tensorflow as tf
  import tensorflow_datasets as tfds

from beit_jax.training import validate
from beit_jax.data import augment
from beit_jax.data import batching
from beit_jax.data import embedded
from beit_jax.data import ops
from beit_jax.data import sources
from beit_jax.data.views import IMAGENET_MEAN, IMAGENET_STD
from beit_jax.errors import ConfigError

IGNORE = 255
EMBEDDED = "embedded:digits"
DATASETS = (
  f"'{EMBEDDED}', 'tfds:NAME' (features image, annotation) or 'folder:ROOT' "
  "(images/ and annotations/)"
)
_LABEL_EXTENSION = ".png"
# mmseg RandomCrop: the crop is redrawn up to this many times while one class dominates.
_CROP_ATTEMPTS = 10
# mmseg PhotoMetricDistortion: brightness delta, contrast / saturation range, hue delta
# (18 of OpenCV's 180 hue steps: a tenth of the circle).
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 32.0, (0.5, 1.5), (0.5, 1.5), 0.1


def _int_pair(v) -> bool:
  return (
    isinstance(v, (tuple, list))
    and len(v) == 2
    and all(validate.number(1, integer=True)(x) for x in v)
  )


def _positive_numbers(v) -> bool:
  return (
    isinstance(v, (tuple, list))
    and len(v) > 0
    and all(validate.number(0, lo_open=True)(x) for x in v)
  )


# With the data source's and the crop's (`sources`, `augment`): run once at start-up
# (`trainers.validate_config`), not by the pipeline.
RULES = (
  sources.RULES
  + augment.RULES
  + (
    ("input.scale", _int_pair, "(long side, short side), integers >= 1, e.g. (2048, 512)"),
    ("input.ratio_range", validate.pair(0.01, 100), "(min, max) with 0.01 <= min <= max"),
    (
      "input.cat_max_ratio",
      validate.number(0, 1, lo_open=True),
      "a number in (0, 1] (1: any crop)",
    ),
    ("input.photometric", lambda v: isinstance(v, bool), "True or False"),
    ("input.reduce_zero_label", lambda v: isinstance(v, bool), "True or False"),
    (
      "input.num_classes",
      validate.number(1, IGNORE - 1, integer=True),
      f"an integer in [1, {IGNORE - 1}] (label {IGNORE} is ignored)",
    ),
    ("input.eval_scales", _positive_numbers, "a non-empty tuple of numbers > 0, e.g. (1.0,)"),
  )
)
CHECKS = augment.CHECKS


# --------------------------------------------------------------------------- embedded set

# Image side, and how many images each split has.
SEG_SIDE = 96
_SEG_COUNTS = {"train": 800, "validation": 120}
# Validation backgrounds come from the right-most third of each photo, training ones from
# the rest; crops of 96..128 px are resized to SEG_SIDE.
_SEG_HOLD_OUT = 1 / 3
_CROP_SIDES = (96, 128)
_DIGITS_PER_IMAGE = (1, 3)
_DIGIT_SIDES = (28, 56)
# The upsampled gray digit, stretched from these levels (in [0, 1]) to transparent..opaque:
# the blur around the stroke stays transparent. A pixel whose opacity is at least _STROKE
# belongs to the digit.
_OPACITY_LEVELS = (0.4, 0.6)
_STROKE = 0.5


def paste_digit(
  image: np.ndarray,
  label: np.ndarray,
  digit: np.ndarray,
  cls: int,
  top: int,
  left: int,
  side: int,
  colour: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
  """One digit pasted in `colour`: its (stretched) gray levels blend the colour in, and the
  pixels of its stroke (opacity >= _STROKE) get label `cls`.

  Args:
    image: uint8 [S, S, 3]; label: uint8 [S, S] (not modified: copies are returned).
    digit: uint8 [h, w] gray digit (255 = stroke), resized to side x side.
    colour: [3] in 0..255.

  Returns:
    (image, label) with the digit in the box at (top, left).
  """
  gray = (
    np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BILINEAR), np.float32)
    / 255.0
  )
  lo, hi = _OPACITY_LEVELS
  alpha = np.clip((gray - lo) / (hi - lo), 0.0, 1.0)[..., None]  # [side, side, 1]
  image, label = image.copy(), label.copy()
  box = (slice(top, top + side), slice(left, left + side))
  image[box] = np.round(alpha * colour + (1 - alpha) * image[box]).astype(np.uint8)
  label[box] = np.where(alpha[..., 0] >= _STROKE, cls, label[box])
  return image, label


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
  """A saturated colour of random hue: bright on a dark background, dark on a bright one."""
  hsv = np.array(
    [[[rng.uniform(0, 255), rng.uniform(180, 255), 70 if background.mean() > 128 else 255]]],
    np.uint8,
  )
  return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), np.float32)[0, 0]


def _background(rng: np.random.Generator, photo: np.ndarray, validation: bool) -> np.ndarray:
  h, w = photo.shape[:2]
  lo = round(w * (1 - _SEG_HOLD_OUT))
  x0, x1 = (lo, w) if validation else (0, lo)
  side = int(rng.integers(_CROP_SIDES[0], min(_CROP_SIDES[1], x1 - x0, h) + 1))
  top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(x0, x1 - side + 1))
  crop = photo[top : top + side, left : left + side]
  return np.asarray(Image.fromarray(crop).resize((SEG_SIDE, SEG_SIDE), Image.Resampling.BILINEAR))


@functools.lru_cache(maxsize=4)
def digits_on_photos(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The embedded segmentation set: a deterministic function of (split, seed).

  Each image is a crop of one of the bundled photos (cycling through them) with 1 to 3
  digits of the digits' own split pasted at random places and sizes (28..56 px), each in a
  saturated colour that contrasts with the crop (bright on dark, dark on bright).

  Args:
    split: 'train' or 'validation'.

  Returns:
    (images uint8 [n, 96, 96, 3], labels uint8 [n, 96, 96]: 0 background, digit d -> d + 1),
    read-only.
  """
  if split not in _SEG_COUNTS:
    raise ValueError(f"split {split!r} is not one of {tuple(_SEG_COUNTS)}")
  digits, classes, _ = embedded.load_labelled("digits", split)
  photos = embedded.load_embedded_images(max_side=384)
  validation = split == "validation"
  rng = np.random.default_rng([seed, int(validation)])
  images, labels = [], []
  for i in range(_SEG_COUNTS[split]):
    image = _background(rng, photos[i % len(photos)], validation)
    label = np.zeros((SEG_SIDE, SEG_SIDE), np.uint8)
    for _ in range(int(rng.integers(_DIGITS_PER_IMAGE[0], _DIGITS_PER_IMAGE[1] + 1))):
      k = int(rng.integers(len(digits)))
      side = int(rng.integers(_DIGIT_SIDES[0], _DIGIT_SIDES[1] + 1))
      top, left = (int(x) for x in rng.integers(0, SEG_SIDE - side + 1, size=2))
      colour = _contrasting_colour(rng, image[top : top + side, left : left + side])
      image, label = paste_digit(
        image, label, digits[k][..., 0], int(classes[k]) + 1, top, left, side, colour
      )
    images.append(image)
    labels.append(label)
  images, labels = np.stack(images), np.stack(labels)
  images.flags.writeable = labels.flags.writeable = False  # shared through the cache
  return images, labels


# --------------------------------------------------------------------------- sources


def _decode_image(data: tf.Tensor) -> tf.Tensor:
  return tf.io.decode_image(data, channels=3, expand_animations=False)  # uint8 [h, w, 3]


def _decode_label(data: tf.Tensor) -> tf.Tensor:
  """An annotation PNG -> uint8 [h, w]: its first channel (TFDS stores 3)."""
  return tf.io.decode_png(data, channels=0)[..., 0]


class _Pairs:
  """A source of (image, label) payloads: `decode_pair(payload) -> (uint8 [h, w, 3], uint8
  [h, w])`; `describe(id)` names an example in messages."""

  name: str
  num_examples: int
  class_names: tuple[str, ...] = ()

  def decode_pair(self, payload):
    raise NotImplementedError

  def decode_crop(self, payload, window_fn):  # the Source protocol: the image part
    image = self.decode_pair(payload)[0]
    return ops.crop(image, window_fn(tf.shape(image)[:2]))

  def describe(self, example_id: int) -> str:
    return f"{self.name} example {example_id}"


class EmbeddedPairs(_Pairs):
  """`digits_on_photos` (or a slice of a split, as 'train[:10%]')."""

  def __init__(self, split: str, field: str):
    try:
      base, start, stop = embedded.parse_split(split)
    except ValueError as e:
      raise ConfigError(f"{field}={split!r} of {EMBEDDED}: {e}") from None
    images, labels = digits_on_photos(base)
    n = len(images)
    bound = lambda b: (
      None if b is None else (round(n * int(b[:-1]) / 100) if b.endswith("%") else int(b))
    )
    window = slice(bound(start), bound(stop))
    images, labels = images[window], labels[window]
    if not len(images):
      raise ConfigError(f"{field}={split!r} of {EMBEDDED} holds no images")
    self.name, self.num_examples = EMBEDDED, len(images)
    self._order = sources.ArraySource(EMBEDDED, images)  # records (id, id)
    self._images, self._labels = tf.constant(images), tf.constant(labels)

  def epoch(self, seed, epoch, start, shard):
    return self._order.epoch(seed, epoch, start, shard)

  def in_order(self):
    return self._order.in_order()

  def decode_pair(self, payload):
    return tf.gather(self._images, payload), tf.gather(self._labels, payload)


def _split_dirs(root: str, split: str, field: str, split_field: str) -> tuple[str, str]:
  """images/<split> and annotations/<split> if they exist, else images and annotations."""
  root = root.rstrip("/")
  images, labels = f"{root}/images", f"{root}/annotations"
  if not tf.io.gfile.isdir(images) or not tf.io.gfile.isdir(labels):
    raise ConfigError(
      f"{field}='folder:{root}': needs the folders {root}/images and {root}/annotations"
    )
  if tf.io.gfile.isdir(f"{images}/{split}"):
    if not tf.io.gfile.isdir(f"{labels}/{split}"):
      raise ConfigError(f"{split_field}={split!r}: {images}/{split} has no {labels}/{split}")
    return f"{images}/{split}", f"{labels}/{split}"
  subdirs = sorted(
    d.rstrip("/") for d in tf.io.gfile.listdir(images) if tf.io.gfile.isdir(f"{images}/{d}")
  )
  if subdirs:
    raise ConfigError(f"{split_field}={split!r} is not a split of {root}: images/ holds {subdirs}")
  return images, labels


class FolderPairs(_Pairs):
  """Image files and their same-stem annotation PNGs (local or gs://)."""

  def __init__(self, root: str, split: str, field: str, split_field: str):
    images_dir, labels_dir = _split_dirs(root, split, field, split_field)
    self.name = f"folder:{root}"
    self._images = sources.FolderSource(images_dir)  # sorted image files, read by id
    paths = sources.list_image_folder(images_dir)[0]
    self._paths = paths
    stems = [p[len(images_dir) + 1 :].rpartition(".")[0] for p in paths]
    label_paths = [f"{labels_dir}/{s}{_LABEL_EXTENSION}" for s in stems]
    present = {
      f"{d.rstrip('/')}/{n}" for d, _, names in tf.io.gfile.walk(labels_dir) for n in names
    }
    missing = [p for p, lp in zip(paths, label_paths) if lp not in present]
    if missing:
      raise ConfigError(
        f"{field}='folder:{root}': {len(missing)} images have no annotation "
        f"(e.g. {missing[0]}: expected {label_paths[paths.index(missing[0])]})"
      )
    self.num_examples = len(paths)
    self._labels = tf.constant(label_paths)

  def _with_label(self, example_id, image_data):
    return example_id, (image_data, tf.io.read_file(tf.gather(self._labels, example_id)))

  def epoch(self, seed, epoch, start, shard):
    return self._images.epoch(seed, epoch, start, shard).map(ops.graph_only(self._with_label))

  def in_order(self):
    return self._images.in_order().map(ops.graph_only(self._with_label))

  def decode_pair(self, payload):
    return _decode_image(payload[0]), _decode_label(payload[1])

  def describe(self, example_id: int) -> str:
    return self._paths[example_id]


class TfdsPairs(_Pairs, sources.TfdsSource):
  """A prepared TFDS data set with `image` and `annotation` features."""

  def __init__(self, name: str, split: str, data_dir: str | None, shuffle_buffer: int):
    super().__init__(name, split, data_dir, shuffle_buffer)
    if "annotation" not in self._features:
      raise ConfigError(
        f"input.dataset='tfds:{name}' has no 'annotation' feature "
        f"(features: {list(self._features)})"
      )
    # Plain graph code, kept from AutoGraph (wrapped here, not by a decorator: a decorator
    # would load TensorFlow when this module is imported).
    self._payload = ops.graph_only(self._payload)

  def _payload(self, example_id, record):
    skip = tfds.decode.SkipDecoding()
    example = self._features.deserialize_example(
      record, decoders={"image": skip, "annotation": skip}
    )
    return example_id, (example["image"], example["annotation"])

  def decode_pair(self, payload):
    return _decode_image(payload[0]), _decode_label(payload[1])


def make_source(cfg: ml_collections.ConfigDict, *, train: bool) -> _Pairs:
  """The training (`input.dataset`, `input.split`) or validation (`input.eval_dataset` or
  the same set, `input.eval_split`) pairs."""
  field = "input.dataset" if train or not cfg.get("eval_dataset") else "input.eval_dataset"
  dataset = cfg.dataset if field == "input.dataset" else cfg.eval_dataset
  split_field = "input.split" if train else "input.eval_split"
  split = cfg.split if train else cfg.eval_split
  kind, _, arg = dataset.partition(":") if isinstance(dataset, str) else ("", "", "")
  if dataset == EMBEDDED:
    return EmbeddedPairs(split, split_field)
  if kind == "folder" and arg:
    return FolderPairs(arg, split, field, split_field)
  if kind == "tfds" and arg:
    try:
      return TfdsPairs(arg, split, cfg.get("data_dir"), cfg.shuffle_buffer)
    except ConfigError as e:  # TfdsSource names input.split for any split
      raise ConfigError(str(e).replace("input.split=", f"{split_field}=", 1)) from None
  raise ConfigError(f"{field}={dataset!r} is not a segmentation data set; accepted: {DATASETS}")


def check(config: ml_collections.ConfigDict) -> None:
  """Both splits exist and fit `input.num_classes` (preflight: before any compute)."""
  train = make_source(config.input, train=True)
  make_source(config.input, train=False)
  if train.name == EMBEDDED and config.input.num_classes != 11:
    raise ConfigError(
      f"input.num_classes={config.input.num_classes} but {EMBEDDED} has 11 "
      "classes (background and the 10 digits)"
    )
  if config.input.reduce_zero_label and train.name == EMBEDDED:
    raise ConfigError(
      f"input.reduce_zero_label=True would ignore the background of {EMBEDDED} (its class 0)"
    )


# --------------------------------------------------------------------------- examples


@dataclasses.dataclass(frozen=True)
class Recipe:
  crop: int
  scale: tuple[int, int]  # (long side, short side), mmseg's img_scale
  ratio_range: tuple[float, float]
  cat_max_ratio: float
  flip: bool
  photometric: bool
  reduce_zero_label: bool
  num_classes: int
  eval_scales: tuple[float, ...]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Recipe":
    c = config.input
    return cls(
      c.image_size,
      (max(c.scale), min(c.scale)),
      tuple(c.ratio_range),
      float(c.cat_max_ratio),
      c.flip,
      c.photometric,
      c.reduce_zero_label,
      c.num_classes,
      tuple(float(s) for s in c.eval_scales),
    )


def rescale_size(h, w, long_side, short_side):
  """mmcv's keep-ratio rescale: the largest size within (long_side, short_side); TF ints."""
  h, w = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
  f = tf.minimum(long_side / tf.maximum(h, w), short_side / tf.minimum(h, w))
  return (tf.cast(tf.floor(h * f + 0.5), tf.int32), tf.cast(tf.floor(w * f + 0.5), tf.int32))


def prepare_label(label: tf.Tensor, recipe: Recipe) -> tuple[tf.Tensor, tf.Tensor]:
  """uint8 [h, w] -> (int32 [h, w] classes or IGNORE, whether any value is no class)."""
  label = tf.cast(label, tf.int32)
  if recipe.reduce_zero_label:  # mmseg: 0 -> 255, x -> x - 1, 255 stays
    label = tf.where((label == 0) | (label == IGNORE), IGNORE, label - 1)
  bad = tf.reduce_any((label != IGNORE) & (label >= recipe.num_classes))
  return label, bad


def _decoded(payload, decode_pair, recipe: Recipe):
  """(image uint8, label int32, problem int32: 0 fine, 1 sizes differ, 2 a value is no class)."""
  image, label = decode_pair(payload)
  label, bad = prepare_label(label, recipe)
  same = tf.reduce_all(tf.shape(image)[:2] == tf.shape(label))
  problem = tf.where(same, tf.where(bad, 2, 0), 1)
  return image, label, problem


PROBLEMS = {1: "its label map has another size", 2: "its label map has a value that is no class"}


def _random_crop_window(label, seed, recipe: Recipe):
  """mmseg RandomCrop: [top, left, height, width]; redrawn (up to 10 times) while the most
  frequent class (ignoring 255) covers `cat_max_ratio` of the crop or more."""
  h, w = tf.shape(label)[0], tf.shape(label)[1]
  ch, cw = tf.minimum(h, recipe.crop), tf.minimum(w, recipe.crop)
  u = tf.random.stateless_uniform([_CROP_ATTEMPTS + 1, 2], seed)
  tops = tf.cast(tf.floor(u[:, 0] * tf.cast(h - ch + 1, tf.float32)), tf.int32)
  lefts = tf.cast(tf.floor(u[:, 1] * tf.cast(w - cw + 1, tf.float32)), tf.int32)

  def ok(k):
    crop = label[tops[k] : tops[k] + ch, lefts[k] : lefts[k] + cw]
    counts = tf.math.bincount(tf.reshape(crop, [-1]), minlength=IGNORE + 1, maxlength=IGNORE + 1)[
      :IGNORE
    ]
    total = tf.maximum(tf.reduce_sum(counts), 1)
    return (tf.math.count_nonzero(counts) > 1) & (
      tf.cast(tf.reduce_max(counts), tf.float32) / tf.cast(total, tf.float32) < recipe.cat_max_ratio
    )

  if recipe.cat_max_ratio >= 1.0:
    k = tf.constant(0)
  else:
    k = tf.while_loop(lambda k: (k < _CROP_ATTEMPTS) & ~ok(k), lambda k: k + 1, [tf.constant(0)])[0]
  return tf.stack([tops[k], lefts[k], ch, cw])


def photometric_distortion(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """mmseg PhotoMetricDistortion on float [h, w, 3] in 0..255: brightness, contrast (before
  or after the rest, at random), saturation, hue; each with probability 1/2."""
  u = tf.random.stateless_uniform([10], seed)
  coin = lambda i: u[i] < 0.5
  between = lambda i, lo, hi: lo + (hi - lo) * u[i]
  clip = lambda x: tf.clip_by_value(x, 0.0, 255.0)
  image = tf.where(coin(0), clip(image + between(1, -_BRIGHTNESS, _BRIGHTNESS)), image)
  contrast = lambda x: tf.where(coin(2), clip(x * between(3, *_CONTRAST)), x)
  contrast_first = coin(4)
  image = tf.where(contrast_first, contrast(image), image)
  hsv = tf.image.rgb_to_hsv(image / 255.0)
  sat = tf.where(
    coin(5), tf.clip_by_value(hsv[..., 1] * between(6, *_SATURATION), 0.0, 1.0), hsv[..., 1]
  )
  hue = tf.where(coin(7), tf.math.floormod(hsv[..., 0] + between(8, -_HUE, _HUE), 1.0), hsv[..., 0])
  image = tf.image.hsv_to_rgb(tf.stack([hue, sat, hsv[..., 2]], -1)) * 255.0
  return tf.where(contrast_first, image, contrast(image))


def _normalize(image255: tf.Tensor) -> tf.Tensor:
  return ops.normalize(image255 / 255.0, IMAGENET_MEAN, IMAGENET_STD)


def _train_example(seed, payload, decode_pair, recipe: Recipe) -> dict:
  scale_seed, crop_seed, flip_seed, color_seed = ops.split(seed, 4)
  image, label, problem = _decoded(payload, decode_pair, recipe)
  # A pair that does not fit fails here: batching drops it and refills its slot (counted).
  tf.debugging.assert_equal(problem, 0, message="label map does not fit its image")
  ratio = tf.random.stateless_uniform([], scale_seed, *recipe.ratio_range)
  long_side = tf.floor(recipe.scale[0] * ratio)  # mmseg: int(img_scale * ratio)
  short_side = tf.floor(recipe.scale[1] * ratio)
  size = rescale_size(tf.shape(image)[0], tf.shape(image)[1], long_side, short_side)
  image = tf.image.resize(tf.cast(image, tf.float32), size, "bilinear", antialias=False)
  label = tf.image.resize(label[..., None], size, "nearest")[..., 0]
  window = _random_crop_window(label, crop_seed, recipe)
  image, label = ops.crop(image, window), ops.crop(label, window)
  if recipe.flip:  # before padding, which stays at the bottom and right (mmseg)
    flipped = tf.random.stateless_uniform([], flip_seed) < 0.5
    image = tf.where(flipped, tf.reverse(image, [1]), image)
    label = tf.where(flipped, tf.reverse(label, [1]), label)
  if recipe.photometric:
    image = photometric_distortion(image, color_seed)
  image = _normalize(image)
  pad_h, pad_w = recipe.crop - tf.shape(image)[0], recipe.crop - tf.shape(image)[1]
  image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])
  label = tf.pad(label, [[0, pad_h], [0, pad_w]], constant_values=IGNORE)
  s = recipe.crop
  return {"image": tf.ensure_shape(image, [s, s, 3]), "label": tf.ensure_shape(label, [s, s])}


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
    An endless iterator of dicts: `image` float32 [b, S, S, 3] (ImageNet-normalised, 0 in
    padding), `label` int32 [b, S, S] (IGNORE in padding and for ignored pixels).
  """
  recipe = Recipe.from_config(config)
  source = make_source(config.input, train=True)
  return batching.make_iterator(
    source,
    ops.graph_only(
      lambda seed, payload, _: _train_example(seed, payload, source.decode_pair, recipe)
    ),
    batch_size=config.input.batch_size,
    seed=seed,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
  )


class EvalData:
  """The validation split, one whole image at a time, in order (every process sees all of
  it: the windows of an image are split over the devices)."""

  def __init__(self, config: ml_collections.ConfigDict):
    batching.hide_accelerators()
    self.recipe = Recipe.from_config(config)
    self.source = make_source(config.input, train=False)
    self.num_examples = self.source.num_examples
    ds = self.source.in_order().map(
      ops.graph_only(self._example), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    self._ds = ds.ignore_errors().prefetch(2).with_options(batching.options())

  def _example(self, example_id, payload) -> dict:
    recipe = self.recipe
    image, label, problem = _decoded(payload, self.source.decode_pair, recipe)
    out = {"id": example_id, "image": image, "label": tf.cast(label, tf.uint8), "problem": problem}
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    pixels = tf.cast(image, tf.float32)
    for k, ratio in enumerate(recipe.eval_scales):  # mmseg MultiScaleFlipAug img_ratios
      size = rescale_size(
        h, w, float(int(recipe.scale[0] * ratio)), float(int(recipe.scale[1] * ratio))
      )
      out[f"view_{k}"] = _normalize(tf.image.resize(pixels, size, "bilinear", antialias=False))
    return out

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    """A fresh pass: dicts of `id`, `image` uint8 [H, W, 3], `label` uint8 [H, W] (IGNORE:
    not scored), `problem` (0: fine, else a key of PROBLEMS) and `views`: float32 [h, w, 3]
    per scale. Undecodable files are left out (missing from the count of images seen)."""
    n = len(self.recipe.eval_scales)
    for example in self._ds.as_numpy_iterator():
      example["views"] = tuple(example.pop(f"view_{k}") for k in range(n))
      yield example
