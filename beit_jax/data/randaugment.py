"""timm's RandAugment and RandomErasing as stateless TF graph ops (docs/reference.md §5).

The fine-tuning recipe's `rand-m9-mstd0.5-inc1`: 2 ops drawn uniformly (with replacement)
from timm's 15 "increasing" ops, each applied with probability 0.5 at a magnitude drawn from
N(9, 0.5) clipped to [0, 10]. Pixel ops reproduce PIL's arithmetic on uint8 values (images
are float32 holding integers 0..255 here); geometric ops sample bilinearly (TF has no
bicubic projective transform; timm uses the training interpolation, bicubic in BEiT).
"""

from __future__ import annotations

import dataclasses
import math
import re

from etils import epy

# Loaded at first use, by a tf.data pipeline: the compute path imports this module without TF.
with epy.lazy_imports():
  import tensorflow as tf

from beit_jax.errors import ConfigError

# timm's _RAND_INCREASING_TRANSFORMS / _RAND_TRANSFORMS, in its order.
OPS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "Posterize",
  "Solarize",
  "SolarizeAdd",
  "Color",
  "Contrast",
  "Brightness",
  "Sharpness",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)
_LEVEL_DENOM = 10.0
_GRAY = (19595, 38470, 7471)  # PIL's RGB -> L weights, in 1/65536


@dataclasses.dataclass(frozen=True)
class Spec:
  """One RandAugment policy (timm's `rand-...` string, parsed)."""

  num_ops: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.5
  increasing: bool = True
  prob: float = 0.5
  fill: tuple[int, int, int] = (124, 116, 104)  # timm's img_mean: the ImageNet mean in uint8
  translate_pct: float = 0.45


def parse(text: str, field: str = "input.randaugment") -> Spec | None:
  """timm's config string, e.g. 'rand-m9-mstd0.5-inc1' ('' -> None: no RandAugment).

  Sections: m (magnitude, 0..10), n (ops per image), mstd (magnitude std), inc (0/1:
  the "increasing" op variants), p (probability of each op).
  """
  if not text:
    return None
  parts = str(text).split("-")
  if parts[0] != "rand":
    raise ConfigError(
      f"{field}={text!r} is invalid; accepted: '' or a timm RandAugment string "
      "like 'rand-m9-mstd0.5-inc1' (sections m, n, mstd, inc, p)"
    )
  kwargs = {}
  for part in parts[1:]:
    m = re.fullmatch(r"(mstd|inc|m|n|p)([0-9.]+)", part)
    try:
      key, value = m.group(1), float(m.group(2))
    except (AttributeError, ValueError):
      raise ConfigError(
        f"{field}={text!r}: section {part!r} is not one of m<float>, n<int>, "
        "mstd<float>, inc<0|1>, p<float>"
      ) from None
    if key == "m" and 0 <= value <= _LEVEL_DENOM:
      kwargs["magnitude"] = value
    elif key == "n" and value >= 1 and value.is_integer():
      kwargs["num_ops"] = int(value)
    elif key == "mstd" and value >= 0:
      kwargs["magnitude_std"] = value
    elif key == "inc" and value in (0, 1):
      kwargs["increasing"] = bool(value)
    elif key == "p" and 0 <= value <= 1:
      kwargs["prob"] = value
    else:
      raise ConfigError(
        f"{field}={text!r}: {part!r} is out of range (m in [0, 10], n >= 1, "
        "mstd >= 0, inc 0 or 1, p in [0, 1])"
      )
  return Spec(**kwargs)


# --------------------------------------------------------------------------- pixel ops


def _floor8(x: tf.Tensor) -> tf.Tensor:
  """PIL's float -> uint8: clip to [0, 255], truncate."""
  return tf.floor(tf.clip_by_value(x, 0.0, 255.0))


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL Image.blend, which ImageEnhance uses: degenerate + factor * (image - degenerate)."""
  return _floor8(degenerate + factor * (image - degenerate))


def _gray(image: tf.Tensor) -> tf.Tensor:
  """PIL convert('L'), [h, w, 1]."""
  r, g, b = tf.unstack(image, axis=-1)
  lum = tf.floor((r * _GRAY[0] + g * _GRAY[1] + b * _GRAY[2] + 32768.0) / 65536.0)
  return lum[..., None]


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  lo = tf.reduce_min(image, axis=[0, 1])
  hi = tf.reduce_max(image, axis=[0, 1])
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  stretched = _floor8(image * scale - lo * scale)
  return tf.where(hi > lo, stretched, image)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.equalize of one band: [h, w] -> [h, w]."""
  values = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256, dtype=tf.int64)
  last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)[:, 0]))  # count of the top value
  step = (tf.reduce_sum(hist) - last) // 255
  safe = tf.maximum(step, 1)
  lut = (step // 2 + tf.cumsum(hist, exclusive=True)) // safe
  lut = tf.cast(tf.minimum(lut, 255), tf.float32)
  return tf.where(step > 0, tf.gather(lut, values), channel)


def equalize(image: tf.Tensor) -> tf.Tensor:
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
  """Keeps the top `bits` bits (PIL: >= 8 keeps the image)."""
  step = tf.pow(2.0, 8.0 - tf.cast(tf.clip_by_value(bits, 0, 8), tf.float32))
  return tf.floor(image / step) * step


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
  return tf.where(image < threshold, image, 255.0 - image)


def solarize_add(image: tf.Tensor, add: tf.Tensor, threshold: float = 128.0) -> tf.Tensor:
  return tf.where(image < threshold, tf.minimum(image + add, 255.0), image)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  return _blend(tf.broadcast_to(_gray(image), tf.shape(image)), image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  mean = tf.floor(tf.reduce_mean(_gray(image)) + 0.5)
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """Blend with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13; border pixels kept)."""
  kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = _floor8(smooth + 0.5)
  inner = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]]) > 0
  degenerate = tf.where(inner, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
  return _blend(degenerate, image, factor)


# --------------------------------------------------------------------------- geometric ops


def affine(image: tf.Tensor, matrix: tf.Tensor, fill: tuple[int, int, int]) -> tf.Tensor:
  """PIL Image.transform(AFFINE): output (x, y) samples input (a x + b y + c, d x + e y + f).

  `matrix` is float32 [6] in PIL's continuous coordinates (pixel i spans [i, i+1));
  outside the image is `fill`. Bilinear, rounded to uint8 values.
  """
  fill = tf.constant(fill, tf.float32)
  a, b, c, d, e, f = tf.unstack(matrix)
  # TF maps pixel indices (centres at i, not i + 0.5): in - 0.5 = M (out + 0.5) + t - 0.5.
  transform = tf.stack([a, b, c + 0.5 * (a + b) - 0.5, d, e, f + 0.5 * (d + e) - 0.5, 0.0, 0.0])[
    None
  ]  # [1, 8]
  shape = tf.shape(image)[:2]
  # Constant fill is a scalar in TF: transform (image - fill) with 0 outside, add fill back.
  out = tf.raw_ops.ImageProjectiveTransformV3(
    images=(image - fill)[None],
    transforms=transform,
    output_shape=shape,
    fill_value=0.0,
    interpolation="BILINEAR",
    fill_mode="CONSTANT",
  )[0]
  return tf.round(out + fill)


def rotate(image: tf.Tensor, degrees: tf.Tensor, fill) -> tf.Tensor:
  """PIL Image.rotate (counter-clockwise, about the centre)."""
  h, w = (tf.cast(s, tf.float32) for s in tf.unstack(tf.shape(image)[:2]))
  a = -degrees * (math.pi / 180.0)
  cos, sin = tf.cos(a), tf.sin(a)
  cx, cy = w / 2.0, h / 2.0
  return affine(
    image, tf.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy]), fill
  )


def _shear_x(image, f, fill):
  return affine(image, tf.stack([1.0, f, 0.0, 0.0, 1.0, 0.0]), fill)


def _shear_y(image, f, fill):
  return affine(image, tf.stack([1.0, 0.0, 0.0, f, 1.0, 0.0]), fill)


def _translate_x(image, pixels, fill):
  return affine(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0]), fill)


def _translate_y(image, pixels, fill):
  return affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels]), fill)


# --------------------------------------------------------------------------- the policy


def apply_op(
  image: tf.Tensor, op: tf.Tensor, magnitude: tf.Tensor, sign: tf.Tensor, spec: Spec
) -> tf.Tensor:
  """OPS[op] at `magnitude` (0..10), or the image unchanged for op == len(OPS).

  `sign` (+-1) negates the signed ones as timm does. Levels as timm's `*_level_to_arg`
  functions (the `increasing` variants if spec says so).
  """
  level = magnitude / _LEVEL_DENOM
  w = tf.cast(tf.shape(image)[1], tf.float32)
  h = tf.cast(tf.shape(image)[0], tf.float32)
  if spec.increasing:
    bits = 4 - tf.cast(tf.floor(level * 4.0), tf.int32)
    threshold = 256.0 - tf.floor(level * 256.0)
    enhance = tf.maximum(0.1, 1.0 + sign * level * 0.9)
  else:
    bits = tf.cast(tf.floor(level * 4.0), tf.int32)
    threshold = tf.floor(level * 256.0)
    enhance = level * 1.8 + 0.1
  shear = sign * level * 0.3
  fill = spec.fill
  branches = [
    lambda: auto_contrast(image),
    lambda: equalize(image),
    lambda: 255.0 - image,
    lambda: rotate(image, sign * level * 30.0, fill),
    lambda: posterize(image, bits),
    lambda: solarize(image, threshold),
    lambda: solarize_add(image, tf.floor(level * 110.0)),
    lambda: color(image, enhance),
    lambda: contrast(image, enhance),
    lambda: brightness(image, enhance),
    lambda: sharpness(image, enhance),
    lambda: _shear_x(image, shear, fill),
    lambda: _shear_y(image, shear, fill),
    lambda: _translate_x(image, sign * level * spec.translate_pct * w, fill),
    lambda: _translate_y(image, sign * level * spec.translate_pct * h, fill),
    lambda: image,
  ]
  return tf.ensure_shape(tf.switch_case(op, branches), image.shape)


def randaugment(image: tf.Tensor, seed: tf.Tensor, spec: Spec) -> tf.Tensor:
  """`spec.num_ops` random ops on a float32 [h, w, 3] image of integer values 0..255."""
  seeds = tf.random.experimental.stateless_split(seed, 4)
  n = spec.num_ops
  ops = tf.random.stateless_uniform([n], seeds[0], 0, len(OPS), dtype=tf.int32)
  skip = tf.random.stateless_uniform([n], seeds[1]) >= spec.prob
  ops = tf.where(skip, len(OPS), ops)  # the identity branch
  noise = tf.random.stateless_normal([n], seeds[2]) * spec.magnitude_std
  magnitudes = tf.clip_by_value(spec.magnitude + noise, 0.0, _LEVEL_DENOM)
  signs = tf.where(tf.random.stateless_uniform([n], seeds[3]) < 0.5, -1.0, 1.0)
  # A loop, not n copies: the 16-branch switch is traced once (tf.data builds it per map).
  return tf.foldl(
    lambda x, args: apply_op(x, *args, spec=spec), (ops, magnitudes, signs), initializer=image
  )


def random_erasing(
  image: tf.Tensor,
  seed: tf.Tensor,
  prob: float,
  scale: tuple[float, float] = (0.02, 1 / 3),
  ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> tf.Tensor:
  """timm RandomErasing(mode='pixel', max_count=1) on a normalised float [h, w, c] image.

  With probability `prob`, the first of 10 random rectangles (area fraction in `scale`,
  log-uniform aspect in `ratio`) that fits is filled with N(0, 1) noise per pixel and channel.
  """
  h, w = (tf.cast(s, tf.float32) for s in tf.unstack(tf.shape(image)[:2]))
  seeds = tf.random.experimental.stateless_split(seed, 3)
  u = tf.random.stateless_uniform([10, 4], seeds[0])
  area = h * w * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
  aspect = tf.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1])
  eh, ew = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
  fits = (ew < w) & (eh < h)
  k = tf.argmax(tf.cast(fits, tf.int32))
  top = tf.floor(u[k, 2] * (h - eh[k] + 1))  # randint(0, h - eh) inclusive
  left = tf.floor(u[k, 3] * (w - ew[k] + 1))
  rows = tf.range(h)[:, None, None]
  cols = tf.range(w)[None, :, None]
  inside = (rows >= top) & (rows < top + eh[k]) & (cols >= left) & (cols < left + ew[k])
  erase = inside & tf.reduce_any(fits) & (tf.random.stateless_uniform([], seeds[1]) < prob)
  return tf.where(erase, tf.random.stateless_normal(tf.shape(image), seeds[2]), image)
