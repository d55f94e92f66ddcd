"""Real photos that ship inside installed packages: a dataset that needs no download.

scikit-image and scikit-learn bundle a few dozen natural and scientific images. Random crops of
them are enough to smoke-test every stage of a run (and to overfit a tiny model) on a machine
without ImageNet or internet access.
"""

import functools
import re

import numpy as np
from PIL import Image
import skimage.data
import sklearn.datasets

# skimage.data loaders that work offline; stereo_motorcycle returns (left, right, disparity).
_SKIMAGE_NAMES = (
  "astronaut",
  "camera",
  "chelsea",
  "coffee",
  "coins",
  "hubble_deep_field",
  "immunohistochemistry",
  "rocket",
  "retina",
  "stereo_motorcycle",
  "brick",
  "grass",
  "gravel",
  "moon",
  "clock",
  "page",
  "text",
  "colorwheel",
)


def _to_rgb(image: np.ndarray) -> np.ndarray:
  """Grayscale [H, W] or RGBA [H, W, 4] -> uint8 [H, W, 3]."""
  if image.ndim == 2:
    image = np.stack([image] * 3, axis=-1)
  image = image[..., :3]
  if image.dtype != np.uint8:
    raise TypeError(f"embedded image has dtype {image.dtype}, expected uint8")
  return np.ascontiguousarray(image)


def _shrink(image: np.ndarray, max_side: int) -> np.ndarray:
  h, w = image.shape[:2]
  if max(h, w) <= max_side:
    return image
  size = (round(w * max_side / max(h, w)), round(h * max_side / max(h, w)))  # PIL: (w, h)
  return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


@functools.lru_cache(maxsize=4)
def _load(max_side: int | None) -> tuple[np.ndarray, ...]:
  images = []
  for name in _SKIMAGE_NAMES:
    image = getattr(skimage.data, name)()
    images.append(_to_rgb(image[0] if name == "stereo_motorcycle" else image))
  images.extend(_to_rgb(x) for x in sklearn.datasets.load_sample_images().images)
  if max_side is not None:
    images = [_shrink(x, max_side) for x in images]
  for image in images:
    image.flags.writeable = False  # shared by every caller through the cache
  return tuple(images)


def load_embedded_images(max_side: int | None = None) -> list[np.ndarray]:
  """The 20 bundled photos (18 from scikit-image, china and flower from scikit-learn).

  Args:
    max_side: if set, larger photos are shrunk (Lanczos) so that their longer side is this.

  Returns:
    uint8 [H, W, 3] arrays of different sizes (172x448 to 1411x1411 at full size), read-only.
  """
  return list(_load(max_side))


# --------------------------------------------------------------------------- labelled sets

LABELLED = ("digits", "photos")
SPLITS = ("train", "validation")
# Digits are stored upsampled (bicubic) so that random crops are not limited to whole pixels
# of the 8x8 originals.
_DIGIT_SIDE = 32
# Every 5th image of each class (digits) / the right-most fifth of each photo's tiles (photos)
# is held out for validation.
_HOLD_OUT = 5
# Photos: shrunk to this longer side, then cut into non-overlapping square tiles of _TILE px.
_PHOTO_SIDE, _TILE = 256, 32
# Tiles with a pixel standard deviation below this are dropped.
_FLAT = 4.0


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
  data = sklearn.datasets.load_digits()
  small = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)  # [n, 8, 8], 0..16 -> 0..255
  images = np.stack(
    [
      np.asarray(Image.fromarray(x).resize((_DIGIT_SIDE, _DIGIT_SIDE), Image.Resampling.BICUBIC))
      for x in small
    ]
  )
  return np.repeat(images[..., None], 3, axis=-1), data.target.astype(np.int64)


def _rank_in_class(labels: np.ndarray) -> np.ndarray:
  """k for the k-th example of its class."""
  rank = np.zeros_like(labels)
  for c in np.unique(labels):
    rank[labels == c] = np.arange(np.sum(labels == c))
  return rank


def _digit_split(split: str) -> tuple[list[np.ndarray], np.ndarray, tuple[str, ...]]:
  images, labels = _digits()
  # Stratified: the k-th image of a class is held out when k % 5 == 0 (the data set cycles
  # through the classes, so a plain i % 5 would hold out only two of them).
  keep = (_rank_in_class(labels) % _HOLD_OUT == 0) == (split == "validation")
  return list(images[keep]), labels[keep], tuple(str(d) for d in range(10))


def _photo_split(split: str) -> tuple[list[np.ndarray], np.ndarray, tuple[str, ...]]:
  tiles, labels = [], []
  for label, photo in enumerate(load_embedded_images(max_side=_PHOTO_SIDE)):
    rows, cols = photo.shape[0] // _TILE, photo.shape[1] // _TILE
    held_out = max(1, round(cols / _HOLD_OUT))  # right-most columns: no pixel is in both splits
    for r in range(rows):
      for c in range(cols):
        tile = photo[r * _TILE : (r + 1) * _TILE, c * _TILE : (c + 1) * _TILE]
        # A flat tile (sky of the moon photo, the clock's wall) shows nothing of its photo.
        if (c >= cols - held_out) == (split == "validation") and tile.std() >= _FLAT:
          tiles.append(tile)
          labels.append(label)
  names = tuple(_SKIMAGE_NAMES) + ("china", "flower")
  # Cycle through the photos (k-th tile of every photo, then the (k+1)-th...), as the digits
  # cycle through their classes, so that a slice such as 'train[:10%]' holds every class.
  labels = np.asarray(labels, np.int64)
  order = np.lexsort((labels, _rank_in_class(labels)))
  return [tiles[i] for i in order], labels[order], names


def load_labelled(name: str, split: str) -> tuple[list[np.ndarray], np.ndarray, tuple[str, ...]]:
  """A labelled image set that ships with scikit-learn / scikit-image.

  'digits': scikit-learn's 1797 handwritten digits (8x8 grayscale, 10 classes), upsampled to
  32x32 RGB; every 5th image of each class is the validation split (360 images).
  'photos': 32x32 tiles of the 20 bundled photos (shrunk to 256 px) labelled by their photo
  (20 classes; flat tiles dropped); the right-most fifth of each photo's tile columns is the
  validation split (693 training, 223 validation tiles).

  Args:
    name: one of LABELLED.
    split: 'train' or 'validation', or a slice of one (`parse_split`).

  Returns:
    (images: uint8 [h, w, 3] arrays, labels: int64 [n], class_names).
  """
  if name not in LABELLED:
    raise ValueError(f"unknown embedded labelled set {name!r}; accepted: {LABELLED}")
  base, start, stop = parse_split(split)
  images, labels, names = (_digit_split if name == "digits" else _photo_split)(base)
  window = slice(*_slice_bounds(start, stop, len(labels)))
  return images[window], labels[window], names


_SLICE = re.compile(r"^(\w+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$")


def parse_split(split: str) -> tuple[str, str | None, str | None]:
  """'train', or a TFDS-style slice of it: 'train[:10%]', 'train[100:]', 'train[:-50]'.

  Slices keep the split's order, which cycles through the classes: a prefix holds them all.

  Raises:
    ValueError: naming the split and the accepted forms.
  """
  match = _SLICE.match(split) if isinstance(split, str) else None
  if not match or match.group(1) not in SPLITS:
    raise ValueError(
      f"split {split!r} is not one of {SPLITS} or a slice of one such as "
      "'train[:10%]' or 'train[:200]'"
    )
  return match.group(1), match.group(2), match.group(3)


def _slice_bounds(start: str | None, stop: str | None, n: int) -> tuple[int | None, int | None]:
  def bound(b):
    if b is None:
      return None
    return round(n * int(b[:-1]) / 100) if b.endswith("%") else int(b)

  return bound(start), bound(stop)
