"""Semantic segmentation evaluation (mmseg's) and the pixel loss.

Each validation image is scored whole, as mmseg's `slide` test mode: per view (the image
resized to `input.scale` times each of `input.eval_scales`, and mirrored if
`input.eval_flip`), windows of the crop size every `input.eval_stride` pixels (the last
one flush with the far edge) run through the model in batches of `input.eval_batch_size`
windows split over the devices; their logits are averaged where windows overlap, resized
(bilinear) to the label's full size, turned into probabilities and summed over the views.
The argmax updates a confusion matrix on device, from which mIoU, pixel accuracy and the
per-class IoU follow (ignored label 255). `best/` keeps the params of the best mIoU.

Shapes: a view is padded to a canvas of whole window steps and a label to a multiple of
64 pixels, so images of many sizes share a few compiled programs; the model's own program
(a batch of windows) is compiled once. Every process walks the whole split in the same
order and contributes its share of each batch of windows.
"""

import collections
import json
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from beit_jax.evaluation import classification
from beit_jax.training import runner
from beit_jax.training import sharding
from beit_jax.training import validate
from beit_jax.training import visuals
from beit_jax.data import segmentation as data
from beit_jax.errors import ConfigError

IGNORE = data.IGNORE
# Label maps are padded to a multiple of this (fewer programs to compile for mixed sizes).
_LABEL_BUCKET = 64
# Validation images drawn (image, prediction, truth) at each evaluation.
NUM_PICTURES = 6

RULES = classification.RULES + (
  ("input.eval_stride", *validate.POSITIVE_INT),
  ("input.eval_flip", lambda v: isinstance(v, bool), "True or False"),
)


def _check_stride(config: ml_collections.ConfigDict) -> None:
  inp = config.get("input")
  if inp is not None and "eval_stride" in inp and inp.eval_stride > inp.image_size:
    raise ConfigError(
      f"input.eval_stride={inp.eval_stride} leaves pixels between windows of "
      f"input.image_size={inp.image_size}; use at most the window size"
    )


CHECKS = (_check_stride,)


# --------------------------------------------------------------------------- loss, metrics


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy and accuracy over the pixels whose label is a class (not IGNORE).

  Args:
    logits: [B, H, W, C]; labels: int [B, H, W].
  """
  valid = (labels != IGNORE) & (labels < logits.shape[-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), jnp.where(valid, labels, 0)
  )
  weight = valid.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(weight), 1.0)
  hits = (jnp.argmax(logits, -1) == labels) * weight
  return jnp.sum(ce * weight) / n, jnp.sum(hits) / n


def confusion_update(confusion: jax.Array, preds: jax.Array, labels: jax.Array) -> jax.Array:
  """confusion [C, C] (rows: true class, columns: predicted) plus the pixels of one map.

  int32 counts: exact up to 2**31 pixels per cell (ADE20K's validation split has ~0.6e9
  pixels in all). Labels that are no class (IGNORE, padding) count nowhere.
  """
  c = confusion.shape[0]
  labels = labels.astype(jnp.int32)
  valid = (labels >= 0) & (labels < c)
  index = jnp.where(valid, labels * c + preds.astype(jnp.int32), 0).reshape(-1)
  counts = jnp.zeros(c * c, jnp.int32).at[index].add(valid.reshape(-1).astype(jnp.int32))
  return confusion + counts.reshape(c, c)


def segmentation_metrics(confusion: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
  """mmseg's metrics of a confusion matrix.

  Returns:
    ({miou, pixel_accuracy, mean_accuracy}, per-class IoU [C] with NaN for a class that is
    neither in the labels nor predicted). mIoU and the mean accuracy skip NaN classes.
  """
  conf = np.asarray(confusion, np.float64)
  hits = np.diag(conf)
  true, predicted = conf.sum(1), conf.sum(0)
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = hits / (true + predicted - hits)
    accuracy = hits / true
  if conf.sum() == 0:
    raise ValueError("no labelled pixel was scored")
  return (
    {
      "miou": float(np.nanmean(iou)),
      "pixel_accuracy": float(hits.sum() / conf.sum()),
      "mean_accuracy": float(np.nanmean(accuracy)),
    },
    iou,
  )


# --------------------------------------------------------------------------- sliding windows


def window_starts(size: int, crop: int, stride: int) -> list[int]:
  """mmseg's slide windows along one axis: every `stride`, the last flush with the edge."""
  grids = max(size - crop + stride - 1, 0) // stride + 1
  return [max(min(i * stride + crop, size) - crop, 0) for i in range(grids)]


def canvas_side(size: int, crop: int, stride: int) -> int:
  """The padded side of a view: whole window steps, at least one window."""
  return crop + math.ceil(max(size - crop, 0) / stride) * stride


def _stitch(canvas: jax.Array, logits: jax.Array, starts: jax.Array, valid: jax.Array) -> jax.Array:
  """Adds each window's logits [n, c, c, C] into the canvas [Hc, Wc, C] at starts [n, 2]."""
  c = logits.shape[1]

  def add(i, canvas):
    at = (starts[i, 0], starts[i, 1], 0)
    window = jax.lax.dynamic_slice(canvas, at, (c, c, canvas.shape[2]))
    return jax.lax.dynamic_update_slice(canvas, window + logits[i] * valid[i], at)

  return jax.lax.fori_loop(0, logits.shape[0], add, canvas)


def _add_view(
  acc: jax.Array,
  canvas: jax.Array,
  counts: jax.Array,
  size: jax.Array,
  label_size: jax.Array,
  *,
  flipped: bool,
) -> jax.Array:
  """acc [Lh, Lw, C] + the softmax of one view's mean logits resized to the label.

  The view fills canvas[:h, :w] (size = (h, w)); its last row and column are repeated
  beyond, so that the resize sees the image's edge as torch's bilinear (align_corners=False)
  does. A mirrored view is mirrored back first.
  """
  hc, wc = canvas.shape[:2]
  logits = canvas / jnp.maximum(counts, 1.0)[..., None]
  rows = jnp.minimum(jnp.arange(hc), size[0] - 1)
  cols = jnp.minimum(jnp.arange(wc), size[1] - 1)
  if flipped:
    cols = size[1] - 1 - cols
  logits = logits[rows][:, cols]
  scale = label_size.astype(jnp.float32) / size.astype(jnp.float32)
  resized = jax.image.scale_and_translate(
    logits, acc.shape, (0, 1), scale, jnp.zeros(2), "linear", antialias=False
  )
  return acc + jax.nn.softmax(resized, axis=-1)


def _score(confusion: jax.Array, acc: jax.Array, label: jax.Array) -> tuple[jax.Array, jax.Array]:
  pred = jnp.argmax(acc, -1).astype(jnp.int32)  # [Lh, Lw]
  return confusion_update(confusion, pred, label), pred


class Evaluator:
  """Whole-image scoring on the mesh (see the module docstring).

  `predict(params, windows [n, c, c, 3]) -> logits [n, c, c, C]` is the model at the
  window size; `n` = `window_batch`, split over the data-parallel devices.
  """

  def __init__(
    self,
    predict: Callable[[Any, jax.Array], jax.Array],
    *,
    mesh: jax.sharding.Mesh,
    params_sharding: Any,
    crop: int,
    stride: int,
    window_batch: int,
    num_classes: int,
    flip: bool,
  ):
    self.crop, self.stride, self.num_classes, self.flip = crop, stride, num_classes, flip
    self.window_batch, self._mesh = window_batch, mesh
    batch, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    self._predict = jax.jit(predict, in_shardings=(params_sharding, batch), out_shardings=batch)
    self._stitch = jax.jit(_stitch, out_shardings=rep, donate_argnums=0)
    self._add_view = jax.jit(
      _add_view, static_argnames=("flipped",), out_shardings=rep, donate_argnums=0
    )
    self._score = jax.jit(_score, out_shardings=(rep, rep), donate_argnums=0)
    self._zeros = jax.jit(jnp.zeros, static_argnums=(0, 1), out_shardings=rep)

  def _global(self, x: np.ndarray) -> jax.Array:
    """A host value every process holds alike -> a replicated global array."""
    return jax.make_array_from_process_local_data(sharding.replicated(self._mesh), np.asarray(x))

  def view_logits(self, params: Any, view: np.ndarray) -> tuple[jax.Array, np.ndarray]:
    """The summed window logits [Hc, Wc, C] of a view [h, w, 3] and the window counts
    [Hc, Wc] (the view fills [:h, :w]; beyond it, zero padding)."""
    h, w = view.shape[:2]
    c, n = self.crop, self.window_batch
    hc, wc = canvas_side(h, c, self.stride), canvas_side(w, c, self.stride)
    padded = np.zeros((hc, wc, 3), np.float32)
    padded[:h, :w] = view
    starts = [
      (y, x) for y in window_starts(h, c, self.stride) for x in window_starts(w, c, self.stride)
    ]
    counts = np.zeros((hc, wc), np.float32)
    for y, x in starts:
      counts[y : y + c, x : x + c] += 1
    canvas = self._zeros((hc, wc, self.num_classes), jnp.float32)
    p, procs = jax.process_index(), jax.process_count()
    for k in range(0, len(starts), n):
      chunk = starts[k : k + n]
      windows = np.zeros((n, c, c, 3), np.float32)
      for i, (y, x) in enumerate(chunk):
        windows[i] = padded[y : y + c, x : x + c]
      share = windows[p * n // procs : (p + 1) * n // procs]
      logits = self._predict(params, sharding.host_to_global({"w": share}, self._mesh)["w"])
      at = np.zeros((n, 2), np.int32)
      at[: len(chunk)] = chunk
      valid = (np.arange(n) < len(chunk)).astype(np.float32)
      canvas = self._stitch(canvas, logits, self._global(at), self._global(valid))
    return canvas, counts

  def predict_image(self, params: Any, views: tuple[np.ndarray, ...], label_shape) -> jax.Array:
    """Summed class probabilities [Lh, Lw, C] of all views, at the label's size (padded)."""
    height, width = label_shape
    acc = self._zeros((_bucket(height), _bucket(width), self.num_classes), jnp.float32)
    for view in views:
      for flipped in (False, True) if self.flip else (False,):
        canvas, counts = self.view_logits(params, view[:, ::-1] if flipped else view)
        acc = self._add_view(
          acc,
          canvas,
          self._global(counts),
          self._global(np.asarray(view.shape[:2], np.int32)),
          self._global(np.asarray(label_shape, np.int32)),
          flipped=flipped,
        )
    return acc

  def evaluate(
    self, params: Any, eval_data: data.EvalData, *, keep: int = NUM_PICTURES
  ) -> tuple[np.ndarray, list, collections.Counter]:
    """One pass of the split: (confusion [C, C] int64, `keep` (image, prediction, label)
    triples of host arrays at the label's size, counts of skipped images by reason)."""
    c = self.num_classes
    confusion = self._zeros((c, c), jnp.int32)
    pictures, skipped, seen = [], collections.Counter(), 0
    for example in eval_data:
      seen += 1
      problem = int(example["problem"])
      if problem:
        if not skipped:
          logging.warning(
            "Skipping %s: %s", eval_data.source.describe(int(example["id"])), data.PROBLEMS[problem]
          )
        skipped[data.PROBLEMS[problem]] += 1
        continue
      label = example["label"]
      acc = self.predict_image(params, example["views"], label.shape)
      padded = np.full((_bucket(label.shape[0]), _bucket(label.shape[1])), IGNORE, np.uint8)
      padded[: label.shape[0], : label.shape[1]] = label
      confusion, pred = self._score(confusion, acc, self._global(padded))
      if len(pictures) < keep:
        h, w = label.shape
        pictures.append((example["image"], np.asarray(pred)[:h, :w], label))
    if seen < eval_data.num_examples:
      skipped["undecodable"] += eval_data.num_examples - seen
    return np.asarray(jax.device_get(confusion), np.int64), pictures, skipped


def _bucket(n: int) -> int:
  return -(-n // _LABEL_BUCKET) * _LABEL_BUCKET


# --------------------------------------------------------------------------- hook


def evaluation_hook(
  ctx: runner.Context,
  config: ml_collections.ConfigDict,
  desc: str,
  predict: Callable[[Any, jax.Array], jax.Array],
) -> runner.Hook:
  """Validation every `eval_every_steps` and at the end: `val_miou`, `val_pixel_accuracy`,
  `val_mean_accuracy` (and `best_val_*`, `best_step`); `best/` (by mIoU), `results.json`
  (with the per-class IoU) and `images/segmentation_<step>.png`."""
  inp = config.input
  window_batch = inp.get("eval_batch_size") or inp.batch_size
  sharding.check_batch_size(window_batch, ctx.mesh, "input.eval_batch_size")
  eval_data = data.EvalData(config)
  evaluator = Evaluator(
    predict,
    mesh=ctx.mesh,
    params_sharding=ctx.state_shardings.params,
    crop=inp.image_size,
    stride=inp.eval_stride,
    window_batch=window_batch,
    num_classes=inp.num_classes,
    flip=inp.eval_flip,
  )
  best = classification.BestCheckpoint(ctx.workdir, key="miou")
  image_dir = epath.Path(ctx.workdir) / "images"
  logging.info(
    "%s: %d validation images, windows of %d every %d px, scales %s%s",
    desc,
    eval_data.num_examples,
    inp.image_size,
    inp.eval_stride,
    tuple(inp.eval_scales),
    " + flips" if inp.eval_flip else "",
  )

  def evaluation(step: int, state) -> dict[str, float]:
    confusion, pictures, skipped = evaluator.evaluate(state.params, eval_data)
    if confusion.sum() == 0:
      raise ConfigError(
        f"{desc}: no validation image could be scored ({eval_data.source.name}"
        f"; skipped: {dict(skipped)})"
      )
    metrics, iou = segmentation_metrics(confusion)
    metrics.update(
      images=float(eval_data.num_examples - sum(skipped.values())),
      skipped=float(sum(skipped.values())),
    )
    improved = best.update(step, state.params, metrics)
    ctx.writer.write_scalars(step, {f"val_{k}": v for k, v in metrics.items()})
    visuals.write_segmentation_images(
      image_dir, ctx.writer, step, pictures, num_classes=inp.num_classes
    )
    last = {f"val_{k}": v for k, v in metrics.items()}
    last.update({f"best_val_{k}": v for k, v in best.metrics.items()}, best_step=best.step)
    logging.info(
      "%s: step %d validation mIoU %.4f, pixel accuracy %.4f (%d images%s)%s",
      desc,
      step,
      metrics["miou"],
      metrics["pixel_accuracy"],
      metrics["images"],
      f", {dict(skipped)} skipped" if skipped else "",
      " (best so far)" if improved else f"; best {best.value:.4f} at {best.step}",
    )
    if jax.process_index() == 0:
      per_class = [None if np.isnan(v) else float(v) for v in iou]
      (epath.Path(ctx.workdir) / "results.json").write_text(
        json.dumps(
          dict(last, step=step, val_class_iou=per_class, val_skipped_reasons=dict(skipped)),
          indent=2,
        )
      )
    return last

  return runner.Hook(config.eval_every_steps, evaluation, best.close)
