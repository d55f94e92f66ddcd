"""Stateless image ops for tf.data: every random choice comes from the seed passed in.

An op is `(image, seed) -> image` (or takes no seed when it is deterministic), so a pipeline
built from them is a pure function of (seed, example): that is what makes a resumed run see
the batches of an uninterrupted one. Images are float [h, w, 3] in [0, 1] unless said.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

from etils import epy

# Loaded at first use, by a tf.data pipeline: the compute path imports this module without TF.
with epy.lazy_imports():
  import tensorflow as tf

# torchvision's RandomResizedCrop tries this many crops before its centre-crop fallback.
_CROP_ATTEMPTS = 10
# torchvision's rgb_to_grayscale weights (used by ColorJitter's contrast and saturation).
_GRAY = (0.2989, 0.587, 0.114)

# (payload, window_fn) -> uint8 [h, w, 3]: decodes one record and crops it to the window that
# window_fn picks from the image's [height, width].
DecodeCrop = Callable[["tf.Tensor", Callable[["tf.Tensor"], "tf.Tensor"]], "tf.Tensor"]


def graph_only(fn: Callable) -> Callable:
  """`fn`, marked for tf.data not to convert it with AutoGraph.

  Pipeline functions are plain TF graph code (explicit tf.while_loop / tf.cond): AutoGraph
  has nothing to convert, and fails noisily on closures and lambdas when it tries.
  """
  return tf.autograph.experimental.do_not_convert(fn)


def fold(seed: tf.Tensor, *data) -> tf.Tensor:
  """A stateless seed [2] int64 derived from `seed` and the ints in `data`."""
  for x in data:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(x, tf.int64))
  return seed


def split(seed: tf.Tensor, n: int) -> list[tf.Tensor]:
  """n independent stateless seeds from one."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  top, left, height, width = tf.unstack(window)
  return image[top : top + height, left : left + width]


def decode_crop(data: tf.Tensor, window_fn) -> tf.Tensor:
  """Encoded image -> uint8 [h, w, 3] crop; grayscale, CMYK and alpha become RGB.

  JPEGs (nearly all of ImageNet) decode only the crop window; other formats decode whole.
  """

  def jpeg():
    return tf.io.decode_and_crop_jpeg(
      data, window_fn(tf.io.extract_jpeg_shape(data)[:2]), channels=3
    )

  def other():
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return crop(image, window_fn(tf.shape(image)[:2]))

  return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def random_crop_window(
  shape: tf.Tensor, seed: tf.Tensor, scale: tuple[float, float], ratio: tuple[float, float]
) -> tf.Tensor:
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


def center_window(shape: tf.Tensor) -> tf.Tensor:
  """The largest centred square: int32 [top, left, side, side]."""
  h, w = tf.unstack(tf.cast(shape, tf.int32))
  side = tf.minimum(h, w)
  return tf.stack([(h - side) // 2, (w - side) // 2, side, side])


def random_resized_crop(
  payload: tf.Tensor,
  decode: DecodeCrop,
  seed: tf.Tensor,
  *,
  scale: tuple[float, float],
  ratio: tuple[float, float],
) -> tf.Tensor:
  """Decodes the random window of torchvision's RandomResizedCrop: float in [0, 1]."""
  window = functools.partial(random_crop_window, seed=seed, scale=scale, ratio=ratio)
  return tf.image.convert_image_dtype(decode(payload, window), tf.float32)


def color_jitter(image: tf.Tensor, strength: float, seed: tf.Tensor) -> tf.Tensor:
  """torchvision ColorJitter(brightness=contrast=saturation=strength, hue=0).

  The three factors are drawn from U(max(0, 1 - strength), 1 + strength) and the ops run in
  a random order.
  """
  order_seed, factor_seed = split(seed, 2)
  factors = tf.random.stateless_uniform(
    [3], factor_seed, minval=max(0.0, 1.0 - strength), maxval=1.0 + strength
  )
  order = tf.argsort(tf.random.stateless_uniform([3], order_seed))  # int32
  return color_ops(image, order, factors)


def color_ops(image: tf.Tensor, order: tf.Tensor, factors: tf.Tensor) -> tf.Tensor:
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


def resize(image: tf.Tensor, size: int, method: str) -> tf.Tensor:
  """Antialiased like PIL when shrinking; [size, size, 3] in [0, 1]."""
  image = tf.image.resize(image, [size, size], method=method, antialias=True)
  return tf.clip_by_value(image, 0.0, 1.0)


def flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mirrored with probability 1/2; the same seed mirrors several views alike."""
  flipped = tf.random.stateless_uniform([], seed) < 0.5
  width = image.shape[1]
  columns = tf.where(flipped, tf.range(width - 1, -1, -1), tf.range(width))
  return tf.gather(image, columns, axis=1)


def normalize(image: tf.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> tf.Tensor:
  return (image - mean) / std
