"""Views: what one shared crop becomes for each consumer (the ViT, a tokenizer, a teacher).

BEiT cuts one random crop per example and shows it twice: to the ViT at 224 (bicubic,
ImageNet-normalised) and to the tokenizer in the input it was trained on (DALL-E: 112,
Lanczos, [0, 1]; VQ-KD: 224 in [-1, 1]). A view is data -- a size, a resize method and a
value mapping -- so a new tokenizer or teacher declares its view instead of adding a
pipeline function. Every view of an example shares its flip.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from etils import epy

# Loaded at first use, by a tf.data pipeline: the compute path imports this module without TF.
with epy.lazy_imports():
  import tensorflow as tf

from beit_jax.data import ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Value mappings of [0, 1] pixels: (mean, std) of (x - mean) / std; None keeps [0, 1].
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
  "unit": None,
  "signed": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # [-1, 1]
  "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
  "clip": (CLIP_MEAN, CLIP_STD),
}
RESIZE_METHODS = ("bicubic", "bilinear", "lanczos3", "lanczos5", "area", "nearest")


@dataclasses.dataclass(frozen=True)
class View:
  """One picture of the shared crop: resize, flip (shared), then map the values."""

  size: int
  resize: str = "bicubic"
  normalization: str = "imagenet"

  def __post_init__(self):
    if self.resize not in RESIZE_METHODS:
      raise ValueError(f"view resize={self.resize!r}; accepted: {RESIZE_METHODS}")
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(
        f"view normalization={self.normalization!r}; accepted: {tuple(NORMALIZATIONS)}"
      )

  def apply(self, crop: tf.Tensor, flip_seed: tf.Tensor | None) -> tf.Tensor:
    """float [h, w, 3] crop in [0, 1] -> [size, size, 3]."""
    image = ops.resize(crop, self.size, self.resize)
    if flip_seed is not None:
      image = ops.flip(image, flip_seed)
    return self.to_model(image)

  def to_model(self, image):
    """[0, 1] pixels -> this view's values (works on tf and NumPy arrays)."""
    stats = NORMALIZATIONS[self.normalization]
    return image if stats is None else ops.normalize(image, *stats)

  def to_pixels(self, values: np.ndarray) -> np.ndarray:
    """The inverse of `to_model`, for pictures."""
    stats = NORMALIZATIONS[self.normalization]
    return values if stats is None else values * np.asarray(stats[1]) + np.asarray(stats[0])


def vit_view(image_size: int) -> View:
  """The backbone's input: bicubic, ImageNet mean/std (the published runs)."""
  return View(image_size, "bicubic", "imagenet")
