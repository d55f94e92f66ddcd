"""The MIM objective: the model a MIM config describes, the masked positions its head reads,
their targets and the loss (visual tokens by cross-entropy, normalised pixels by MSE).

A library module, so that the trainer (trainers/mim.py) and the benchmark's per-part timing
run the same loss.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from beit_jax.models import vit

MIM_TARGETS = ("tokens", "pixels")


def predicts_pixels(config: ml_collections.ConfigDict) -> bool:
  return config.get("mim_target", "tokens") == "pixels"


def make_model(config: ml_collections.ConfigDict, *, train: bool = True) -> vit.VisionTransformer:
  """The ViT + MIM head a config describes (vocabulary from the tokenizer; for pixels,
  patch * patch * 3 outputs).

  With `model.patch_aggregation` (BEiT v2) it also has the shallow decoder
  (`cls_pt_layers_<j>`) and outputs 'mim_logits_c'.
  """
  pa = config.model.get("patch_aggregation")
  extra = (
    {} if pa is None else dict(patch_aggregation_layer=pa.layer, patch_aggregation_depth=pa.depth)
  )
  outputs = (
    config.input.patch_size**2 * 3 if predicts_pixels(config) else config.tokenizer.vocab_size
  )
  return vit.from_config(
    config.model, image_size=config.input.image_size, train=train, vocab_size=outputs, **extra
  )


def mim_loss(
  logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy averaged over all masked positions of the whole batch.

  Args:
    logits: [B, K, V] at the gathered positions.
    targets: [B, K] visual tokens there.
    weights: [B, K] 1 where the position is really masked (K is a static bound).
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  n = jnp.maximum(weights.sum(), 1.0)
  loss = (ce * weights).sum() / n
  correct = (jnp.argmax(logits, -1) == targets) * weights
  return loss, {
    "loss": loss,
    "mim_accuracy": correct.sum() / n,
    "masked_per_image": weights.sum(1).mean(),
  }


def patch_pixels(images: jax.Array, patch: int) -> jax.Array:
  """[B, S, S, 3] -> [B, N, patch * patch * 3], each patch at zero mean, unit variance."""
  b, s, _, c = images.shape
  g = s // patch
  x = images.reshape(b, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, g * g, patch * patch * c).astype(jnp.float32)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-6)


def pixel_loss(
  predictions: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MSE over the pixels of the masked positions. predictions, targets: [B, K, P]."""
  se = jnp.mean(jnp.square(predictions.astype(jnp.float32) - targets), -1)  # [B, K]
  n = jnp.maximum(weights.sum(), 1.0)
  loss = (se * weights).sum() / n
  return loss, {"loss": loss, "masked_per_image": weights.sum(1).mean()}


def masked_positions(mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The first `k` masked patch indices per image, padded; and their validity.

  Static shapes: K is the most patches a mask can have, so the MIM head only runs on
  K (not N) positions whatever the number masked.
  """
  order = jnp.argsort(~mask, axis=1, stable=True)[:, :k]  # [B, K], masked first
  return order.astype(jnp.int32), jnp.take_along_axis(mask, order, 1).astype(jnp.float32)


def max_masked(config: ml_collections.ConfigDict) -> int:
  """The `k` of `masked_positions`: the most patches `config.input.mask` can mask."""
  mask = config.input.mask
  return max(mask.num_masking_patches, mask.get("max_num_patches") or 0)


def targets_at(
  batch: dict[str, jax.Array], positions: jax.Array, tokens: jax.Array | None, patch_size: int
) -> jax.Array:
  """What the head predicts at `positions` [B, K]: the visual tokens [B, K] of view 2
  (`tokens` [B, h, w], the tokenizer's output), or with `tokens=None` the normalised pixels
  [B, K, P] of view 1's patches."""
  if tokens is None:
    pixels = patch_pixels(batch["image"], patch_size)  # [B, N, P]
    return jnp.take_along_axis(pixels, positions[..., None], 1)
  return jnp.take_along_axis(tokens.reshape(tokens.shape[0], -1), positions, 1)


def objective(
  params: Any,
  model: vit.VisionTransformer,
  batch: dict[str, jax.Array],
  positions: jax.Array,
  targets: jax.Array,
  weights: jax.Array,
  rng: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The MIM loss of `params` on `batch` and its metrics; BEiT v2 (`mim_logits_c`):
  L_MIM + L_MIM^c, unweighted."""
  loss_of: Callable = pixel_loss if targets.ndim == 3 else mim_loss
  out = model.apply(
    {"params": params},
    batch["image"],
    batch["mask"],
    train=True,
    mim_positions=positions,
    rngs={"dropout": rng},
  )
  loss, metrics = loss_of(out["mim_logits"], targets, weights)
  if "mim_logits_c" in out:
    loss_c, metrics_c = loss_of(out["mim_logits_c"], targets, weights)
    loss = loss + loss_c
    metrics.update(loss=loss, loss_mim=metrics["loss"], loss_mim_c=loss_c)
    if "mim_accuracy" in metrics_c:
      metrics["mim_accuracy_c"] = metrics_c["mim_accuracy"]
  return loss, metrics
