"""tf.data pipelines of BEiT pretraining and tokenizer training, and the fixed picture batch.

One jittered random crop per example, shown through each of the views the caller declares
(e.g. `{"image": the ViT's view, "tokenizer_image": the tokenizer's}`), all flipped alike,
plus a blockwise mask over the ViT's patch grid. Yields host NumPy batches for this process.
"""

from __future__ import annotations

import ml_collections
from etils import epy

# Loaded at first use, by a tf.data pipeline: the compute path imports this module without TF.
with epy.lazy_imports():
  import tensorflow as tf

from beit_jax.data import masking
from beit_jax.data import augment
from beit_jax.data import batching
from beit_jax.data import ops
from beit_jax.data import sources
from beit_jax.data.views import View
from beit_jax.errors import ConfigError

# The rules of `config.input`, run once at start-up (`trainers.validate_config`): the
# pipelines below read a config that passed them.
RULES = sources.RULES + augment.RULES
# Salt of the fixed picture batch's masks.
_EVAL_SALT = 3


def num_train_examples(config: ml_collections.ConfigDict) -> int:
  """Examples in one epoch of `input.dataset` (embedded: `input.embedded_epoch_size`).

  For a folder this counts files, undecodable ones included. The embedded set's count is
  read from the config without building its source: plans and benchmarks need no TF.
  """
  cfg = config.input
  if cfg.get("dataset") == "embedded" and cfg.get("embedded_epoch_size"):
    return cfg.embedded_epoch_size
  return sources.make_source(cfg).num_examples


def _mask_spec(cfg: ml_collections.ConfigDict) -> masking.MaskSpec:
  return masking.mask_spec_from_config(cfg.mask, augment.patch_grid(cfg))


def _check_mask(config: ml_collections.ConfigDict) -> None:
  """`input.mask` makes a mask of the ViT's patch grid (MaskSpec's errors, at start-up)."""
  inp = config.get("input")
  if inp is not None and "mask" in inp and "image_size" in inp and "patch_size" in inp:
    _mask_spec(inp)


CHECKS = augment.CHECKS + (_check_mask,)


def _views_and_mask(
  crop: tf.Tensor, seed: tf.Tensor, views: dict[str, View], flip: bool, spec: masking.MaskSpec
) -> dict:
  flip_seed, mask_seed = ops.split(seed, 2)
  out = {name: view.apply(crop, flip_seed if flip else None) for name, view in views.items()}
  out["mask"] = tf.ensure_shape(masking.make_mask_tf(spec, mask_seed), [spec.num_patches])
  return out


def make_pretrain_iterator(
  config: ml_collections.ConfigDict,
  views: dict[str, View],
  *,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> batching.BatchIterator:
  """BEiT pretraining batches of this process, from step `start_step` on.

  Returns:
    An endless iterator of dicts: one float32 [b, S, S, 3] array per view (S its size) and
    `mask` bool [b, N], N = (input.image_size / input.patch_size)^2;
    b = input.batch_size / process_count.
  """
  cfg = config.input
  aug, spec = augment.Augment.from_config(cfg), _mask_spec(cfg)

  def example(seed, payload, decode):
    crop_seed, views_seed = ops.split(seed, 2)
    crop = augment.jittered_crop(payload, decode, crop_seed, aug)
    return _views_and_mask(crop, views_seed, views, aug.flip, spec)

  return batching.make_iterator(
    sources.make_source(cfg),
    example,
    batch_size=cfg.batch_size,
    seed=seed,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
  )


def make_tokenizer_iterator(
  config: ml_collections.ConfigDict,
  view: View | dict[str, View],
  *,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> batching.BatchIterator:
  """Tokenizer training batches: `image` float32 [b, T, T, 3] in `view`; no mask.

  The same crop, flip and jitter as pretraining and the tokenizer's view there, so the
  tokenizer trains on what it will tokenize. `view` may be a dict of views (e.g. VQ-KD's
  `{"image": its own, "teacher_image": the teacher's}`): one array per name, all of the
  same crop and flipped alike. A single View is `{"image": view}`.
  """
  cfg = config.input
  aug = augment.Augment.from_config(cfg)
  views = {"image": view} if isinstance(view, View) else dict(view)

  def example(seed, payload, decode):
    crop_seed, flip_seed = ops.split(seed, 2)
    crop = augment.jittered_crop(payload, decode, crop_seed, aug)
    flip_seed = flip_seed if aug.flip else None
    return {name: v.apply(crop, flip_seed) for name, v in views.items()}

  return batching.make_iterator(
    sources.make_source(cfg),
    example,
    batch_size=cfg.batch_size,
    seed=seed,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
  )


def make_eval_batch(
  config: ml_collections.ConfigDict,
  views: dict[str, View],
  n: int,
  seed: int = 0,
  masks: bool = True,
) -> dict:
  """A fixed batch for pictures, with the keys of pretraining (`masks=False`: no `mask`, and
  no `input.mask` read: a tokenizer's run).

  The first n decodable images in source order (embedded: photo i % 20), centre square crop,
  no flip or jitter; only the masks depend on `seed`.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  batching.hide_accelerators()
  cfg = config.input
  source, spec = sources.make_source(cfg), _mask_spec(cfg) if masks else None
  base = batching.base_seed(seed)

  def one(example_id, payload):
    crop = tf.image.convert_image_dtype(source.decode_crop(payload, ops.center_window), tf.float32)
    if spec is None:  # no flip: the views need no seed
      return {**{name: v.apply(crop, None) for name, v in views.items()}, "_id": example_id}
    out = _views_and_mask(crop, ops.fold(base, _EVAL_SALT, example_id), views, False, spec)
    return {**out, "_id": example_id}

  examples = source.in_order().map(one, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
  batch = next(batching.one_batch(examples, n).with_options(batching.options()).as_numpy_iterator())
  if len(batch.pop("_id")) < n:
    raise ConfigError(f"input.dataset={source.name!r} has fewer than n={n} decodable images")
  return batch
