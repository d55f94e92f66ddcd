"""The training crop every pipeline shares: random resized crop, flip, colour jitter.

Settings come from `config.input`; their rules live here, next to the code that reads them.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from etils import epy

# Loaded at first use, by a tf.data pipeline: the compute path imports this module without TF.
with epy.lazy_imports():
  import tensorflow as tf

from beit_jax.training import validate
from beit_jax.data import ops
from beit_jax.errors import ConfigError

RULES = (
  ("input.batch_size", *validate.POSITIVE_INT),
  ("input.image_size", *validate.POSITIVE_INT),
  ("input.patch_size", *validate.POSITIVE_INT),
  ("input.embedded_epoch_size", *validate.POSITIVE_INT),
  ("input.crop_scale", validate.pair(0, 1), "(min, max) with 0 <= min <= max <= 1"),
  ("input.crop_ratio", validate.pair(0.0001, 100), "(min, max) aspect ratios, min <= max"),
  ("input.color_jitter", validate.number(0), "a number >= 0 (0: off)"),
  ("input.flip", lambda v: isinstance(v, bool), "True or False"),
)


@dataclasses.dataclass(frozen=True)
class Augment:
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  flip: bool
  color_jitter: float

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "Augment":
    return cls(tuple(cfg.crop_scale), tuple(cfg.crop_ratio), cfg.flip, float(cfg.color_jitter))


def jittered_crop(
  payload: tf.Tensor, decode: ops.DecodeCrop, seed: tf.Tensor, augment: Augment
) -> tf.Tensor:
  """One random resized crop, colour-jittered: float [h, w, 3] in [0, 1].

  Every view of an example is resized from this, so they show the same pixels (unilm: one
  crop, two pictures).
  """
  crop_seed, jitter_seed = ops.split(seed, 2)
  crop = ops.random_resized_crop(
    payload, decode, crop_seed, scale=augment.crop_scale, ratio=augment.crop_ratio
  )
  if augment.color_jitter > 0:
    crop = ops.color_jitter(crop, augment.color_jitter, jitter_seed)
  return crop


def patch_grid(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
  """The ViT's patch grid, checked: the masks are drawn on it."""
  if cfg.image_size % cfg.patch_size:
    raise ConfigError(
      f"input.image_size={cfg.image_size} must be a multiple of input.patch_size={cfg.patch_size}"
    )
  return (cfg.image_size // cfg.patch_size,) * 2


def check_patch_grid(config: ml_collections.ConfigDict) -> None:
  if "input" in config and "image_size" in config.input and "patch_size" in config.input:
    patch_grid(config.input)


CHECKS = (check_patch_grid,)
