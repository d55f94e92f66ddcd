"""Real photos that ship inside installed packages: a dataset that needs no download.

scikit-image and scikit-learn bundle a few dozen natural and scientific images. Random crops of
them are enough to smoke-test every stage of a run (and to overfit a tiny model) on a machine
without ImageNet or internet access.
"""
import functools

import numpy as np
from PIL import Image
import skimage.data
import sklearn.datasets

# skimage.data loaders that work offline; stereo_motorcycle returns (left, right, disparity).
_SKIMAGE_NAMES = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field",
    "immunohistochemistry", "rocket", "retina", "stereo_motorcycle", "brick", "grass", "gravel",
    "moon", "clock", "page", "text", "colorwheel")


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
