"""tf.data input pipelines for BEiT pretraining and tokenizer training (SPEC §2-§4).

Yields host NumPy batches for this process only; nothing here touches jax or devices.

Every batch is a deterministic function of (seed, step), so a run resumed at step k sees exactly
the batches an uninterrupted run sees:
  * An epoch is a fixed-length sequence of (example id, encoded image) records per process: a
    stateless permutation of ids for indexable sources (embedded photos, image folders); for
    TFDS, a file order plus a shuffle buffer, both seeded by (seed, epoch). Resuming skips whole
    epochs for free and the consumed records of the current epoch before anything is decoded.
  * Records are cut into groups of one batch before decoding, and each example's crop, flip,
    jitter and mask come from stateless RNG seeded by (seed, epoch, id): a batch depends on its
    group only.
  * An image that fails to decode is dropped and counted (`skipped_counts`); its slot is filled
    with a new augmentation of another image of the same group (refill rounds), so a bad file
    never shifts the batches after it.
"""
import collections
from collections.abc import Callable, Iterator
import dataclasses
import functools
import math

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from beit_jax import embedded_data
from beit_jax import masking
from beit_jax.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The labelled sets of embedded_data by their `input.dataset` names.
EMBEDDED_LABELLED = tuple(f"embedded:{n}" for n in embedded_data.LABELLED)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
AUTOTUNE = tf.data.AUTOTUNE

# torchvision's RandomResizedCrop tries this many crops before its centre-crop fallback.
_CROP_ATTEMPTS = 10
# torchvision's rgb_to_grayscale weights (used by ColorJitter's contrast and saturation).
_GRAY = (0.2989, 0.587, 0.114)
# A batch is refilled from its own decodable images in up to this many rounds, so it survives
# up to 7 undecodable images in 8; more than that means the data is broken.
_MAX_ROUNDS = 8
# TFDS files read at once; with the shuffle buffer this mixes examples across files.
_FILE_CYCLE = 16
# Embedded photos are shrunk to about ImageNet's resolution (mean ~400x350): crops of the
# 1411x1411 retina would make colour jitter several times slower than on ImageNet.
_EMBEDDED_MAX_SIDE = 512
# Salts that keep the random streams apart.
_ORDER, _EXAMPLE, _EVAL = 1, 2, 3

_SKIPPED = collections.Counter(undecodable=0)

# Pipeline functions are plain TF graph code (explicit tf.while_loop / tf.cond): AutoGraph
# has nothing to convert, and fails noisily on closures and lambdas when it tries.
_graph_only = tf.autograph.experimental.do_not_convert

# (payload, window_fn) -> uint8 [h, w, 3]: decodes one record and crops it to the window that
# window_fn picks from the image's [height, width].
DecodeCrop = Callable[[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]], tf.Tensor]


def skipped_counts() -> dict[str, int]:
  """Examples dropped by this process's training iterators since it started, by reason.

  'undecodable': images that failed to decode (their batch slots were refilled).
  """
  return dict(_SKIPPED)


# --------------------------------------------------------------------------- config


def _get(cfg: ml_collections.ConfigDict, name: str):
  if name not in cfg:
    raise ConfigError(f"input.{name} is missing from the config")
  return cfg[name]


def _int_field(cfg: ml_collections.ConfigDict, name: str) -> int:
  value = _get(cfg, name)
  if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1):
    raise ConfigError(f"input.{name} must be an int >= 1, got {value!r}")
  return int(value)


def _range_field(cfg: ml_collections.ConfigDict, name: str, hi: float) -> tuple[float, float]:
  value = _get(cfg, name)
  try:
    lo_v, hi_v = (float(v) for v in value)
  except (TypeError, ValueError):
    lo_v = hi_v = math.nan
  if not 0 < lo_v <= hi_v <= hi:
    raise ConfigError(f"input.{name} must be a pair (lo, hi) with 0 < lo <= hi <= {hi}, "
                      f"got {value!r}")
  return lo_v, hi_v


@dataclasses.dataclass(frozen=True)
class _Views:
  """What one example becomes: crop, flip and jitter settings, output sizes, mask."""
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  flip: bool
  color_jitter: float
  tokenizer_image_size: int
  image_size: int | None = None  # None: tokenizer stage, one view only
  mask_spec: masking.MaskSpec | None = None


def _augment_fields(cfg: ml_collections.ConfigDict) -> dict:
  """crop_scale, crop_ratio, flip and color_jitter of `cfg`, checked."""
  flip = _get(cfg, "flip")
  if not isinstance(flip, bool):
    raise ConfigError(f"input.flip must be True or False, got {flip!r}")
  jitter = _get(cfg, "color_jitter")
  if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not jitter >= 0:
    raise ConfigError(f"input.color_jitter must be a number >= 0 (0 disables it), got {jitter!r}")
  return dict(crop_scale=_range_field(cfg, "crop_scale", 1.0),
              crop_ratio=_range_field(cfg, "crop_ratio", math.inf), flip=flip,
              color_jitter=float(jitter))


def _views_from_config(cfg: ml_collections.ConfigDict, *, pretrain: bool) -> _Views:
  views = _Views(**_augment_fields(cfg),
                 tokenizer_image_size=_int_field(cfg, "tokenizer_image_size"))
  if not pretrain:
    return views
  image_size, patch_size = _int_field(cfg, "image_size"), _int_field(cfg, "patch_size")
  if image_size % patch_size:
    raise ConfigError(f"input.image_size={image_size} must be a multiple of "
                      f"input.patch_size={patch_size}")
  grid = (image_size // patch_size,) * 2
  return dataclasses.replace(views, image_size=image_size,
                             mask_spec=masking.mask_spec_from_config(_get(cfg, "mask"), grid))


# --------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class _Shard:
  """This process's part of every epoch."""
  index: int
  count: int
  batch_size: int  # per process
  steps_per_epoch: int

  @property
  def epoch_length(self) -> int:
    return self.batch_size * self.steps_per_epoch


class _Source:
  """Examples with ids 0..num_examples-1, each an encoded image (embedded: a photo index)."""
  name: str  # the `input.dataset` value, for messages
  num_examples: int

  def epoch(self, seed: tf.Tensor, epoch: tf.Tensor, start: tf.Tensor,
            shard: _Shard) -> tf.data.Dataset:
    """(id, payload) records of one epoch of `shard` from its position `start` on."""
    raise NotImplementedError

  def in_order(self) -> tf.data.Dataset:
    """(id, payload) records in source order."""
    raise NotImplementedError

  def decode_crop(self, payload: tf.Tensor, window_fn) -> tf.Tensor:
    return _decode_crop(payload, window_fn)


class _IndexedSource(_Source):
  """Random access by id: an epoch is a stateless permutation, a resume costs nothing."""

  def load(self, example_id: tf.Tensor) -> tf.Tensor:
    raise NotImplementedError

  def epoch(self, seed, epoch, start, shard):
    order_seed = _fold(seed, _ORDER, epoch)
    global_batch = shard.batch_size * shard.count

    def example_id(position):
      # Step s of the epoch takes permuted positions [s*B, (s+1)*B) and process p its p-th
      # slice, so the global batch does not depend on the number of processes.
      step, row = position // shard.batch_size, position % shard.batch_size
      position = step * global_batch + shard.index * shard.batch_size + row
      return tf.random.experimental.index_shuffle(
          position, order_seed, tf.constant(self.num_examples - 1, tf.int64))

    ids = tf.data.Dataset.range(start, shard.epoch_length).map(_graph_only(example_id))
    return ids.map(_graph_only(lambda i: (i, self.load(i))), num_parallel_calls=AUTOTUNE)

  def in_order(self):
    return tf.data.Dataset.range(self.num_examples).map(_graph_only(lambda i: (i, self.load(i))))


class _ArraySource(_IndexedSource):
  """uint8 images held in memory (the embedded sets); example id -> image id % count."""

  def __init__(self, name: str, images, num_examples: int | None = None):
    self.name, self._count = name, len(images)
    self.num_examples = self._count if num_examples is None else num_examples
    # Eager constants are captured by reference in the tf.data functions.
    self._pixels = tf.constant(np.concatenate([x.reshape(-1) for x in images]))  # uint8 [T]
    self._offsets = tf.constant(np.cumsum([0] + [x.size for x in images]), tf.int64)
    self._shapes = tf.constant([x.shape[:2] for x in images], tf.int32)  # [n, 2]

  def load(self, example_id):
    return example_id % self._count

  def decode_crop(self, payload, window_fn):
    shape = self._shapes[payload]
    image = tf.reshape(self._pixels[self._offsets[payload]:self._offsets[payload + 1]],
                       [shape[0], shape[1], 3])
    return _crop(image, window_fn(shape))


def load_labelled(name: str, split: str, field: str):
  """`embedded_data.load_labelled`, its errors (and an empty slice) as ConfigErrors of `field`."""
  try:
    images, labels, class_names = embedded_data.load_labelled(name, split)
  except ValueError as e:
    raise ConfigError(f"{field} of embedded:{name}: {e}") from None
  if not images:
    raise ConfigError(f"{field} {split!r} of embedded:{name} holds no images")
  return images, labels, class_names


def _embedded_source(epoch_size: int) -> _ArraySource:
  """Random crops of the photos bundled with scikit-image/scikit-learn; id -> photo id % 20."""
  return _ArraySource("embedded", embedded_data.load_embedded_images(max_side=_EMBEDDED_MAX_SIDE),
                      epoch_size)


class _FolderSource(_IndexedSource):
  """Image files under a directory (local or gs://)."""

  def __init__(self, root: str):
    self.name = f"folder:{root}"
    paths, _, _ = list_image_folder(root)
    self.num_examples = len(paths)
    self._paths = tf.constant(paths)

  def load(self, example_id):
    # Read outside the per-example map: a file that cannot be read is an error, not a skip.
    return tf.io.read_file(tf.gather(self._paths, example_id))


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
      f"{dirpath.rstrip('/')}/{name}" for dirpath, _, names in tf.io.gfile.walk(root)
      for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise ConfigError(f"{field}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
  tops = [p[len(prefix):].split("/")[0] if "/" in p[len(prefix):] else None for p in paths]
  class_names = tuple(sorted({t for t in tops if t is not None}))
  index = {name: i for i, name in enumerate(class_names)}
  return tuple(paths), tuple(index.get(t, -1) for t in tops), class_names


class _TfdsSource(_Source):
  """A prepared TFDS dataset (TFRecord files), read without decoding the images."""

  def __init__(self, name: str, split: str, data_dir: str | None, shuffle_buffer: int):
    self.name = f"tfds:{name}"
    field = f"input.dataset={self.name!r}"
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
      raise ConfigError(f"{field}: TFDS knows no dataset {name!r} (not registered, nothing "
                        f"prepared in input.data_dir={data_dir})") from None
    root = builder.data_dir_root
    if not builder.is_prepared():
      how = f"run `tfds build {name} --data_dir={root}`"
      if name.split("/")[0].split(":")[0] == "imagenet2012":
        how = (f"download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into "
               f"{root}/downloads/manual/, then {how}")
      raise ConfigError(f"{field} is not prepared in input.data_dir={root}: {how}")
    info = builder.info
    if "image" not in info.features:
      raise ConfigError(f"{field} has no 'image' feature (features: {list(info.features)})")
    if info.file_format != tfds.core.FileFormat.TFRECORD:
      raise ConfigError(f"{field} is stored as {info.file_format.value}; this pipeline reads "
                        f"tfrecord: rebuild with `tfds build {name} --file_format=tfrecord`")
    try:
      split_info = info.splits[split]
    except (KeyError, ValueError):
      raise ConfigError(f"input.split={split!r} is not a split of {name}; available: "
                        f"{sorted(info.splits)}") from None
    self.num_examples = split_info.num_examples
    self._features = info.features
    self._buffer = shuffle_buffer
    # (file, records to skip, records to read, id of the first one read)
    self._instructions, first = [], 0
    for ins in split_info.file_instructions:
      self._instructions.append((ins.filename, ins.skip, ins.take, first))
      first += ins.take

  def _shard_instructions(self, shard: _Shard) -> list[tuple[str, int, int, int]]:
    """The contiguous ids [i*n/P, (i+1)*n/P) of process i, as file instructions."""
    per_process = self.num_examples // shard.count
    lo, hi = shard.index * per_process, (shard.index + 1) * per_process
    out = []
    for filename, skip, take, first in self._instructions:
      a, b = max(lo, first), min(hi, first + take)
      if a < b:
        out.append((filename, skip + a - first, b - a, a))
    return out

  def _image_bytes(self, example_id, record):
    example = self._features.deserialize_example(
        record, decoders={"image": tfds.decode.SkipDecoding()})
    return example_id, example["image"]

  def epoch(self, seed, epoch, start, shard):
    instructions = self._shard_instructions(shard)
    files, skips, takes, firsts = _instruction_tensors(instructions)
    file_seed, buffer_seed = tf.unstack(
        tf.random.experimental.stateless_split(_fold(seed, _ORDER, epoch), 2))
    order = tf.random.experimental.stateless_shuffle(tf.range(tf.size(files)), file_seed)

    def read(k):
      records = tf.data.TFRecordDataset(files[k]).skip(skips[k]).take(takes[k])
      return records.enumerate(firsts[k])

    records = tf.data.Dataset.from_tensor_slices(order).interleave(
        read, cycle_length=min(_FILE_CYCLE, len(instructions)),
        num_parallel_calls=AUTOTUNE, deterministic=True)
    records = records.shuffle(
        self._buffer, reshuffle_each_iteration=False,
        seed=tf.random.stateless_uniform([], buffer_seed, minval=None, maxval=None,
                                         dtype=tf.int64))
    return records.take(shard.epoch_length).skip(start).map(
        self._image_bytes, num_parallel_calls=AUTOTUNE)

  def in_order(self):
    files, skips, takes, firsts = _instruction_tensors(self._instructions)
    return tf.data.Dataset.range(len(self._instructions)).flat_map(_graph_only(
        lambda k: tf.data.TFRecordDataset(files[k]).skip(skips[k]).take(takes[k]).enumerate(
            firsts[k]))).map(self._image_bytes)


def _instruction_tensors(instructions) -> tuple[tf.Tensor, ...]:
  files, skips, takes, firsts = zip(*instructions)
  return (tf.constant(files), tf.constant(skips, tf.int64), tf.constant(takes, tf.int64),
          tf.constant(firsts, tf.int64))


def _make_source(cfg: ml_collections.ConfigDict) -> _Source:
  dataset = _get(cfg, "dataset")
  kind, sep, arg = dataset.partition(":") if isinstance(dataset, str) else ("", "", "")
  if dataset == "embedded":
    return _embedded_source(_int_field(cfg, "embedded_epoch_size"))
  if kind == "embedded" and arg in embedded_data.LABELLED:  # its images, labels unused
    return _ArraySource(dataset, load_labelled(arg, _get(cfg, "split"), "input.split")[0])
  if sep and arg and kind == "folder":
    return _FolderSource(arg)
  if sep and arg and kind == "tfds":
    return _TfdsSource(arg, _get(cfg, "split"), _get(cfg, "data_dir"),
                       _int_field(cfg, "shuffle_buffer"))
  raise ConfigError(f"input.dataset must be 'embedded', {EMBEDDED_LABELLED}, 'tfds:NAME' or "
                    f"'folder:PATH', got {dataset!r}")


def num_train_examples(config: ml_collections.ConfigDict) -> int:
  """Examples in one epoch of `input.dataset` (embedded: `input.embedded_epoch_size`).

  For a folder this counts files, undecodable ones included.
  """
  return _make_source(config.input).num_examples


# --------------------------------------------------------------------------- per example


def _fold(seed: tf.Tensor, *data) -> tf.Tensor:
  """A stateless seed [2] int64 derived from `seed` and the ints in `data`."""
  for x in data:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(x, tf.int64))
  return seed


def _base_seed(seed: int) -> tf.Tensor:
  return tf.constant([seed, 0], tf.int64)


def _crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  top, left, height, width = tf.unstack(window)
  return image[top:top + height, left:left + width]


def _decode_crop(data: tf.Tensor, window_fn) -> tf.Tensor:
  """Encoded image -> uint8 [h, w, 3] crop; grayscale, CMYK and alpha become RGB.

  JPEGs (nearly all of ImageNet) decode only the crop window; other formats decode whole.
  """
  def jpeg():
    return tf.io.decode_and_crop_jpeg(
        data, window_fn(tf.io.extract_jpeg_shape(data)[:2]), channels=3)

  def other():
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return _crop(image, window_fn(tf.shape(image)[:2]))

  return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def _random_crop_window(shape: tf.Tensor, seed: tf.Tensor, scale: tuple[float, float],
                        ratio: tuple[float, float]) -> tf.Tensor:
  """torchvision RandomResizedCrop.get_params: int32 [top, left, height, width].

  All 10 attempts are drawn at once and the first that fits is kept (same distribution);
  if none fits, the whole image is cut to the nearest allowed aspect ratio, centred.
  """
  h, w = tf.unstack(tf.cast(shape, tf.float32))
  u = tf.random.stateless_uniform([_CROP_ATTEMPTS, 4], seed)
  area = h * w * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[:, 1])
  crop_w, crop_h = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
  fits = (crop_w > 0) & (crop_w <= w) & (crop_h > 0) & (crop_h <= h)
  top = tf.floor(u[:, 2] * (h - crop_h + 1))  # randint(0, h - crop_h) inclusive
  left = tf.floor(u[:, 3] * (w - crop_w + 1))
  k = tf.argmax(tf.cast(fits, tf.int32))
  attempt = tf.stack([top[k], left[k], crop_h[k], crop_w[k]])
  in_ratio = w / h
  fall_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
  fall_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  fallback = tf.stack([tf.floor((h - fall_h) / 2), tf.floor((w - fall_w) / 2), fall_h, fall_w])
  return tf.cast(tf.where(tf.reduce_any(fits), attempt, fallback), tf.int32)


def _center_window(shape: tf.Tensor) -> tf.Tensor:
  """The largest centred square: int32 [top, left, side, side]."""
  h, w = tf.unstack(tf.cast(shape, tf.int32))
  side = tf.minimum(h, w)
  return tf.stack([(h - side) // 2, (w - side) // 2, side, side])


def _color_jitter(image: tf.Tensor, strength: float, seed: tf.Tensor) -> tf.Tensor:
  """torchvision ColorJitter(brightness=contrast=saturation=strength, hue=0).

  Works on float [h, w, 3] in [0, 1]: the three factors are drawn from
  U(max(0, 1 - strength), 1 + strength) and the ops run in a random order.
  """
  order_seed, factor_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  factors = tf.random.stateless_uniform([3], factor_seed, minval=max(0.0, 1.0 - strength),
                                        maxval=1.0 + strength)
  order = tf.argsort(tf.random.stateless_uniform([3], order_seed))  # int32
  return _color_ops(image, order, factors)


def _color_ops(image: tf.Tensor, order: tf.Tensor, factors: tf.Tensor) -> tf.Tensor:
  """Brightness (op 0), contrast (1), saturation (2) in `order`; factors[op] is op's factor.

  Each op blends the image with a reference -- black (brightness), its mean gray level
  (contrast), each pixel's gray level (saturation) -- and clips to [0, 1]. A blend is one 3x3
  colour matrix plus an offset: 3x faster than separate ops, and without branches, which are
  slow to build in tf.data.
  """
  to_gray = tf.constant(_GRAY)  # [3]
  gray_matrix = to_gray[:, None] * tf.ones([1, 3])  # [3, 3]: every channel <- gray level
  pixels = tf.reshape(image, [-1, 3])  # [h*w, 3]
  for k in range(3):
    op, factor = order[k], factors[order[k]]
    matrix = factor * tf.eye(3) + (1.0 - factor) * tf.cast(op == 2, tf.float32) * gray_matrix
    mean_gray = tf.tensordot(tf.reduce_mean(pixels, axis=0), to_gray, 1)
    offset = (1.0 - factor) * tf.cast(op == 1, tf.float32) * mean_gray
    pixels = tf.clip_by_value(tf.matmul(pixels, matrix) + offset, 0.0, 1.0)
  return tf.reshape(pixels, tf.shape(image))


def _resize(image: tf.Tensor, size: int, method: str) -> tf.Tensor:
  """Antialiased like PIL when shrinking; [size, size, 3] in [0, 1]."""
  image = tf.image.resize(image, [size, size], method=method, antialias=True)
  return tf.clip_by_value(image, 0.0, 1.0)


def _augmented_crop(payload: tf.Tensor, decode_crop: DecodeCrop, seed: tf.Tensor,
                    views: _Views) -> tf.Tensor:
  """One random resized crop, colour-jittered: float [h, w, 3] in [0, 1].

  Both views are resized from this, so they show the same pixels (unilm: one crop, two pics).
  """
  crop_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  crop = decode_crop(payload, functools.partial(
      _random_crop_window, seed=crop_seed, scale=views.crop_scale, ratio=views.crop_ratio))
  crop = tf.image.convert_image_dtype(crop, tf.float32)
  if views.color_jitter > 0:
    crop = _color_jitter(crop, views.color_jitter, jitter_seed)
  return crop


def _maybe_flip(images: list[tf.Tensor], seed: tf.Tensor, views: _Views) -> list[tf.Tensor]:
  """Mirrors all views of an example or none (after resizing: cheaper, and it commutes)."""
  if not views.flip:
    return images
  flipped = tf.random.stateless_uniform([], seed) < 0.5
  out = []
  for image in images:
    width = image.shape[1]
    columns = tf.where(flipped, tf.range(width - 1, -1, -1), tf.range(width))
    out.append(tf.gather(image, columns, axis=1))
  return out


def _pretrain_views(crop: tf.Tensor, seed: tf.Tensor, views: _Views) -> dict:
  flip_seed, mask_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image, tokenizer_image = _maybe_flip(
      [_resize(crop, views.image_size, "bicubic"),
       _resize(crop, views.tokenizer_image_size, "lanczos3")], flip_seed, views)
  return {
      "image": (image - IMAGENET_MEAN) / IMAGENET_STD,  # [S, S, 3]
      "tokenizer_image": tokenizer_image,  # [T, T, 3]
      "mask": tf.ensure_shape(masking.make_mask_tf(views.mask_spec, mask_seed),
                              [views.mask_spec.num_patches]),  # [N]
  }


def _pretrain_example(seed, payload, decode_crop, views: _Views) -> dict:
  crop_seed, views_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  return _pretrain_views(_augmented_crop(payload, decode_crop, crop_seed, views), views_seed,
                         views)


def _tokenizer_example(seed, payload, decode_crop, views: _Views) -> dict:
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  crop = _augmented_crop(payload, decode_crop, crop_seed, views)
  image, = _maybe_flip([_resize(crop, views.tokenizer_image_size, "lanczos3")], flip_seed, views)
  return {"image": image}


# --------------------------------------------------------------------------- batching


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def _hide_accelerators():
  """TF must leave GPUs to jax (TPUs are invisible to TF anyway)."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF was initialised before: only harmful if it saw a GPU
    if tf.config.get_visible_devices("GPU"):
      logging.warning("TensorFlow already initialised and sees GPUs: %s",
                      tf.config.get_visible_devices("GPU"))


def _one_batch(examples: tf.data.Dataset, n: int) -> tf.data.Dataset:
  """Exactly one element: a batch of the first n examples, shorter (even empty) if fewer."""
  batched = examples.take(n).batch(n)
  empty = tf.nest.map_structure(lambda s: tf.zeros([0, *s.shape[1:]], s.dtype),
                                batched.element_spec)
  return batched.concatenate(tf.data.Dataset.from_tensors(empty)).take(1)


class BatchIterator(Iterator[dict[str, np.ndarray]]):
  """This process's batches as dicts of NumPy arrays.

  Adds the images it had to drop to `skipped_counts()`.

  Attributes:
    last_ids: int64 [b] example ids of the last batch (refilled slots repeat an id).
  """

  def __init__(self, ds: tf.data.Dataset, batch_size: int, source_name: str):
    self._iterator = ds.as_numpy_iterator()
    self._batch_size, self._source_name = batch_size, source_name
    self.last_ids: np.ndarray | None = None

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self.last_ids, fresh = batch.pop("_id"), batch.pop("_fresh")
    if len(fresh) < self._batch_size:
      raise ConfigError(
          f"input.dataset={self._source_name!r}: only {len(fresh)} of {self._batch_size} images "
          f"of a batch could be decoded and augmented, even in {_MAX_ROUNDS} refill rounds; is "
          f"it image data?")
    _SKIPPED["undecodable"] += int(np.sum(~fresh))
    return batch


def _make_iterator(config: ml_collections.ConfigDict, example_fn, views, *, seed: int,
                   start_step: int, process_index: int, process_count: int,
                   source: _Source | None = None) -> BatchIterator:
  """Batches of `example_fn(seed, payload, decode_crop, views)` over `source` (default: the
  unlabelled source `config.input` names)."""
  _hide_accelerators()
  cfg = config.input
  source = _make_source(cfg) if source is None else source
  batch_size = _int_field(cfg, "batch_size")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  if batch_size % process_count:
    raise ConfigError(f"input.batch_size={batch_size} must be divisible by the number of "
                      f"processes ({process_count})")
  steps_per_epoch = source.num_examples // batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f"input.batch_size={batch_size} is larger than input.dataset="
                      f"{source.name!r} ({source.num_examples} examples)")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  shard = _Shard(process_index, process_count, batch_size // process_count, steps_per_epoch)
  start_epoch, start_batch = divmod(start_step, steps_per_epoch)
  base = _base_seed(seed)
  b = shard.batch_size

  def epoch_groups(epoch):  # raw records of one epoch, one batch per element
    start = tf.cast(epoch == start_epoch, tf.int64) * (start_batch * b)
    records = source.epoch(base, epoch, start, shard).batch(b, drop_remainder=True)
    return records.map(_graph_only(
        lambda ids, payloads: {"epoch": epoch, "id": ids, "payload": payloads}))

  def group_batch(group):  # decode and augment one group into exactly one batch
    def round_examples(round_):
      def one(example_id, payload):
        example = example_fn(_fold(base, _EXAMPLE, group["epoch"], example_id, round_),
                             payload, source.decode_crop, views)
        return {**example, "_id": example_id, "_fresh": tf.equal(round_, 0)}
      examples = tf.data.Dataset.from_tensor_slices((group["id"], group["payload"]))
      return examples.map(one, num_parallel_calls=AUTOTUNE, deterministic=True).ignore_errors()
    return _one_batch(tf.data.Dataset.range(_MAX_ROUNDS).flat_map(round_examples), b)

  ds = tf.data.Dataset.counter(start_epoch).flat_map(_graph_only(epoch_groups))
  # Two groups in flight so the tail of one batch overlaps the head of the next.
  ds = ds.interleave(group_batch, cycle_length=2, num_parallel_calls=2, deterministic=True)
  ds = ds.prefetch(2).with_options(_options())
  return BatchIterator(ds, b, source.name)


def make_pretrain_iterator(config: ml_collections.ConfigDict, *, seed: int, start_step: int = 0,
                           process_index: int = 0, process_count: int = 1) -> BatchIterator:
  """BEiT pretraining batches of this process, from step `start_step` on.

  Returns:
    An endless iterator of dicts: `image` float32 [b, S, S, 3] (bicubic, ImageNet-normalised),
    `tokenizer_image` float32 [b, T, T, 3] (Lanczos, in [0, 1]) of the same crop, `mask` bool
    [b, N]; b = input.batch_size / process_count, S = input.image_size,
    T = input.tokenizer_image_size, N = (S / input.patch_size)^2.
  """
  views = _views_from_config(config.input, pretrain=True)
  return _make_iterator(config, _pretrain_example, views, seed=seed, start_step=start_step,
                        process_index=process_index, process_count=process_count)


def make_tokenizer_iterator(config: ml_collections.ConfigDict, *, seed: int, start_step: int = 0,
                            process_index: int = 0, process_count: int = 1) -> BatchIterator:
  """Tokenizer (dVAE) training batches: `image` float32 [b, T, T, 3] in [0, 1].

  The same crop, flip and jitter as pretraining and the same Lanczos resize as the
  tokenizer's view there, so the tokenizer trains on what it will tokenize.
  """
  views = _views_from_config(config.input, pretrain=False)
  return _make_iterator(config, _tokenizer_example, views, seed=seed, start_step=start_step,
                        process_index=process_index, process_count=process_count)


def make_eval_batch(config: ml_collections.ConfigDict, n: int, seed: int = 0) -> dict:
  """A fixed batch for visualisations, the same keys as pretraining.

  The first n decodable images in source order (embedded: photo i % 20), centre square crop,
  no flip or jitter; only the masks depend on `seed`.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  _hide_accelerators()
  cfg = config.input
  views = dataclasses.replace(_views_from_config(cfg, pretrain=True), flip=False)
  source = _make_source(cfg)
  base = _base_seed(seed)

  def one(example_id, payload):
    crop = tf.image.convert_image_dtype(source.decode_crop(payload, _center_window), tf.float32)
    return {**_pretrain_views(crop, _fold(base, _EVAL, example_id), views), "_id": example_id}

  examples = source.in_order().map(one, num_parallel_calls=AUTOTUNE).ignore_errors()
  batch = next(_one_batch(examples, n).with_options(_options()).as_numpy_iterator())
  if len(batch.pop("_id")) < n:
    raise ConfigError(f"input.dataset={source.name!r} has fewer than n={n} decodable images")
  return batch
