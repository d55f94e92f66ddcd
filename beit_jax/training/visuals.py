"""Pictures of a run, as PNG files in `<workdir>/images/` and as TensorBoard images.

Tokenizer reconstructions, the masked input, what the MIM head predicts for the masked
patches, and the self-attention map of a reference patch (the paper's figure). Every
picture names its rows (and, where useful, its columns) in a white margin drawn into the
image, so the PNG and the TensorBoard image say what they show. The pieces (grids with
labels, heat overlays, patch outlines, token colours) also serve `beit_jax.visualize`.
Tokenizers are used only through `beit_jax.tokenizers`' interface.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from beit_jax import tokenizers
from beit_jax.training import validate
from beit_jax.data.views import View
from beit_jax.models import vit

if TYPE_CHECKING:  # annotations only: clu's metric_writers package imports TensorFlow
  from clu import metric_writers

# How often a run that draws pictures (MIM, dVAE, VQ-KD: their READS) writes them.
RULES = (("images_every_steps", *validate.POSITIVE_INT),)


def to_uint8(x: np.ndarray) -> np.ndarray:
  return (np.clip(np.asarray(x, np.float32), 0, 1) * 255).round().astype(np.uint8)


def image_grid(
  rows: list[np.ndarray],
  pad: int = 2,
  *,
  row_labels: list[str] | None = None,
  col_labels: list[str] | None = None,
) -> np.ndarray:
  """Rows of [n, H, W, 3] images in [0, 1] -> one [R*(H+pad), n*(W+pad), 3] picture.

  With `row_labels` (one per row) and/or `col_labels` (one per column) the picture gets a
  labelled left and/or top margin (`label_grid`); raises ValueError on a count mismatch.
  """
  h = max(r.shape[1] for r in rows)
  w = max(r.shape[2] for r in rows)
  if row_labels is not None and len(row_labels) != len(rows):
    raise ValueError(
      f"image_grid: {len(row_labels)} row labels {list(row_labels)} for {len(rows)} rows"
    )
  if col_labels is not None and len(col_labels) != rows[0].shape[0]:
    raise ValueError(
      f"image_grid: {len(col_labels)} column labels {list(col_labels)} for "
      f"{rows[0].shape[0]} columns"
    )
  out = np.ones((len(rows) * (h + pad), rows[0].shape[0] * (w + pad), 3), np.float32)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      img = _resize_nearest(img, h, w)
      out[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = img
  return label_grid(out, row_labels, col_labels, row_height=h + pad, col_width=w + pad)


LABEL_GAP = 3  # pixels between a label and the margin's edges


def label_font(cell_height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  """Pillow's built-in font at 1/8 of a grid cell's height, 10 to 18 pixels."""
  return ImageFont.load_default(size=int(np.clip(cell_height // 8, 10, 18)))


def label_margins(
  row_labels: list[str] | None, col_labels: list[str] | None, row_height: int
) -> tuple[int, int]:
  """(top, left) margins in pixels that `label_grid` adds for these labels."""
  font = label_font(row_height)
  ascent, descent = font.getmetrics()
  top = ascent + descent + 2 * LABEL_GAP if col_labels else 0
  left = max(math.ceil(font.getlength(t)) for t in row_labels) + 2 * LABEL_GAP if row_labels else 0
  return top, left


def label_grid(
  grid: np.ndarray,
  row_labels: list[str] | None = None,
  col_labels: list[str] | None = None,
  *,
  row_height: int,
  col_width: int,
) -> np.ndarray:
  """A white left margin naming each row and a white top margin naming each column.

  Args:
    grid: [R * row_height, C * col_width, 3] in [0, 1] (e.g. `image_grid`'s, enlarged).
    row_labels: R short names, written left-aligned beside the middle of each row.
    col_labels: C short names, written centred above each column.
    row_height, col_width: a cell's size with its padding; the text scales with row_height.

  Returns:
    [top + R * row_height, left + C * col_width, 3], `label_margins`' (top, left); the grid
    itself unchanged at its bottom right. Raises ValueError when a label count does not
    match the grid.
  """
  for labels, size, step, what in (
    (row_labels, grid.shape[0], row_height, "row"),
    (col_labels, grid.shape[1], col_width, "column"),
  ):
    if labels is not None and (size % step or size // step != len(labels)):
      raise ValueError(
        f"label_grid: {len(labels)} {what} labels {list(labels)} for a grid "
        f"of {size / step:g} {what}s ({size} pixels, {step} per {what})"
      )
  top, left = label_margins(row_labels, col_labels, row_height)
  if not top and not left:
    return grid
  out = np.ones((top + grid.shape[0], left + grid.shape[1], 3), np.float32)
  out[top:, left:] = grid
  text = Image.new("L", (out.shape[1], out.shape[0]), 255)
  draw, font = ImageDraw.Draw(text), label_font(row_height)
  line = sum(font.getmetrics())
  for i, label in enumerate(row_labels or []):
    draw.text(
      (LABEL_GAP, top + i * row_height + (row_height - line) // 2), label, fill=0, font=font
    )
  for j, label in enumerate(col_labels or []):
    x = left + j * col_width + (col_width - font.getlength(label)) / 2
    draw.text((max(0.0, x), LABEL_GAP), label, fill=0, font=font)
  return out * (np.asarray(text, np.float32)[..., None] / 255.0)


def _resize_nearest(img: np.ndarray, h: int, w: int) -> np.ndarray:
  ys = np.arange(h) * img.shape[0] // h
  xs = np.arange(w) * img.shape[1] // w
  return img[ys][:, xs]


def save(
  image_dir: epath.Path,
  writer: metric_writers.MetricWriter,
  step: int,
  name: str,
  picture: np.ndarray,
) -> None:
  """Writes `<image_dir>/<name>_<step>.png` and a TensorBoard image `name`."""
  if jax.process_index() != 0:
    return
  image_dir.mkdir(parents=True, exist_ok=True)
  write_png(image_dir / f"{name}_{step:07d}.png", picture)
  writer.write_images(step, {name: to_uint8(picture)[None]})


def write_png(path: epath.Path, picture: np.ndarray) -> None:
  """[H, W, 3] in [0, 1] -> an 8-bit PNG (local path or gs://)."""
  buf = io.BytesIO()
  Image.fromarray(to_uint8(picture)).save(buf, format="PNG")
  epath.Path(path).write_bytes(buf.getvalue())


def patch_mask_to_pixels(mask: np.ndarray, image_size: int) -> np.ndarray:
  """[B, N] patch mask -> [B, S, S, 1] pixel mask."""
  g = int(round(np.sqrt(mask.shape[1])))
  m = mask.reshape(-1, g, g).astype(np.float32)
  return np.repeat(np.repeat(m, image_size // g, 1), image_size // g, 2)[..., None]


def attention_overlay(images: np.ndarray, attention: np.ndarray, ref: int) -> np.ndarray:
  """Heat map of where patch `ref` attends, over the images.

  Args:
    images: [B, S, S, 3] in [0, 1].
    attention: [B, heads, N+1, N+1] softmax maps of one layer.
    ref: patch index (0-based, without [CLS]) of the reference patch.
  """
  att = attention[:, :, 1 + ref, 1:].mean(1)  # [B, N]
  out = heat_overlay(images, att / np.maximum(att.max(1, keepdims=True), 1e-12))
  ref_mask = patch_mask_to_pixels(
    np.eye(att.shape[1])[ref][None].repeat(len(att), 0), images.shape[1]
  )
  return np.where(ref_mask > 0, np.array([0.0, 1.0, 0.0]), out)  # reference in green


def heat_overlay(images: np.ndarray, heat: np.ndarray) -> np.ndarray:
  """Red per-patch heat over dimmed images.

  Args:
    images: [B, S, S, 3] in [0, 1].
    heat: [B, N] in [0, 1], one value per patch (row-major, S divisible by sqrt(N)).
  """
  heat = patch_mask_to_pixels(heat, images.shape[1])  # [B, S, S, 1]
  red = np.concatenate([np.ones_like(heat), np.zeros_like(heat), np.zeros_like(heat)], -1)
  return 0.4 * images + 0.6 * heat * red


def outline_patch(
  images: np.ndarray, ref: int, grid: int, color: tuple[float, float, float] = (0.0, 1.0, 0.0)
) -> np.ndarray:
  """A box along the inner border of patch `ref` (row-major in a grid x grid layout).

  Unlike a filled marker it leaves the patch's own value (e.g. its attention to
  itself) visible. The line is 1/8 of the patch side thick (at least 1 pixel).

  Args:
    images: [B, S, S, 3], S divisible by `grid`.
    ref: patch index in [0, grid**2).
    grid: patches per side.
  """
  p = images.shape[1] // grid
  top, left, w = (ref // grid) * p, (ref % grid) * p, max(1, p // 8)
  box = np.zeros(images.shape[1:3], bool)
  box[top : top + p, left : left + p] = True
  box[top + w : top + p - w, left + w : left + p - w] = False
  return np.where(box[None, :, :, None], np.asarray(color, images.dtype), images)


def token_colors(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
  """int token ids [...] -> [..., 3] in [0, 1]: one fixed colour per id.

  The palette depends only on `vocab_size`, so an id has the same colour in every
  picture; the colours are random (seed 0) so that neighbouring ids differ, and
  distinct ids get distinct colours even as 8-bit PNG pixels (a 64-level lattice).
  """
  if vocab_size > 64**3:
    raise ValueError(f"token_colors: at most {64**3} distinct colours, got {vocab_size} ids")
  levels = np.linspace(0.05, 1.0, 64, dtype=np.float32)
  codes = np.random.default_rng(0).choice(64**3, size=vocab_size, replace=False)
  palette = levels[np.stack([codes // 64**2, codes // 64 % 64, codes % 64], -1)]  # [V, 3]
  return palette[np.asarray(tokens)]


def grayscale(images: np.ndarray) -> np.ndarray:
  """[..., 3] RGB -> [..., 3] grey (ITU-R 601 luma in every channel)."""
  luma = images @ np.asarray([0.299, 0.587, 0.114], np.float32)
  return np.repeat(luma[..., None], 3, -1)


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
  """[..., H, W, C] -> [..., factor*H, factor*W, C], nearest neighbour (crisp patches)."""
  return np.repeat(np.repeat(images, factor, -3), factor, -2)


def write_tokenizer_images(
  image_dir: epath.Path,
  writer,
  step: int,
  images: np.ndarray,
  *,
  tokenizer: tokenizers.Tokenizer,
  params: Any,
) -> None:
  """Originals (top, 'input') and their decoding from their tokens (bottom, '<name> recon.')."""
  images = jnp.asarray(images)
  recon = tokenizer.decode(params, tokenizer.tokenize(params, images))
  if recon is None:
    return
  name = f"{tokenizer.kind}_reconstructions"
  save(
    image_dir,
    writer,
    step,
    name,
    image_grid(
      [np.asarray(images), np.asarray(recon)],
      row_labels=["input", f"{tokenizer.entry.name} recon."],
    ),
  )


def write_mim_images(
  image_dir: epath.Path,
  writer,
  step: int,
  batch: dict[str, np.ndarray],
  *,
  model: vit.VisionTransformer,
  params: Any,
  tokenizer: tokenizers.Tokenizer,
  tok_params: Any,
  vit_view: View,
) -> None:
  """Rows, labelled so: input, masked, tokenizer reconstruction, prediction, attention.

  The MIM prediction decodes the tokens the model predicts at masked patches (true tokens
  elsewhere) with the tokenizer's decoder (both rows are left out if it has none); the
  attention row shows the last layer's attention (mean over heads) of the centre patch.
  """
  images = jnp.asarray(batch["image"])
  mask = jnp.asarray(batch["mask"])
  out = model.apply({"params": params}, images, mask, return_attention=True)
  tokens = tokenizer.tokenize(tok_params, jnp.asarray(batch["tokenizer_image"]))
  g = tokens.shape[1]
  predicted = jnp.where(
    mask.reshape(tokens.shape), jnp.argmax(out["mim_logits"], -1).reshape(tokens.shape), tokens
  )
  original = np.clip(vit_view.to_pixels(np.asarray(images)), 0, 1)
  pixel_mask = patch_mask_to_pixels(np.asarray(mask), original.shape[1])
  masked = original * (1 - pixel_mask) + 0.5 * pixel_mask
  ref = (g // 2) * g + g // 2
  attention = np.asarray(out["attention"][-1], np.float32)
  decoded = {
    f"{tokenizer.entry.name} recon.": tokenizer.decode(tok_params, tokens),
    "prediction": tokenizer.decode(tok_params, predicted),
  }
  rows = {"input": original, "masked": masked}
  rows.update({k: np.asarray(d) for k, d in decoded.items() if d is not None})
  rows["attention"] = attention_overlay(original, attention, ref)
  save(image_dir, writer, step, "mim", image_grid(list(rows.values()), row_labels=list(rows)))


def code_patches(
  images: np.ndarray, tokens: np.ndarray, *, num_codes: int = 8, per_code: int = 8
) -> tuple[np.ndarray, list[np.ndarray]]:
  """The BEiT v2 paper's code visualisation: image patches that share a code.

  Args:
    images: [n, S, S, 3] pixels in [0, 1].
    tokens: int [n, g, g] their codes (patch side S / g).
    num_codes: how many codes: the most frequent in `tokens` (ties: lower id first).
    per_code: patches shown per code (in image order; fewer if the code has fewer).

  Returns:
    (codes [m] int, m <= num_codes; one [per_code, p, p, 3] array per code, rows of
    white padding where a code has fewer patches).
  """
  images, tokens = np.asarray(images, np.float32), np.asarray(tokens)
  n, g = tokens.shape[0], tokens.shape[1]
  p = images.shape[1] // g
  patches = images[:, : g * p, : g * p].reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(n * g * g, p, p, 3)
  flat = tokens.reshape(-1)
  ids, counts = np.unique(flat, return_counts=True)
  order = np.lexsort((ids, -counts))[:num_codes]
  codes = ids[order]
  rows = []
  for code in codes:
    chosen = patches[flat == code][:per_code]
    pad = np.ones((per_code - len(chosen), p, p, 3), np.float32)
    rows.append(np.concatenate([chosen, pad]))
  return codes, rows


def write_code_images(
  image_dir: epath.Path,
  writer,
  step: int,
  images: np.ndarray,
  *,
  tokenizer: tokenizers.Tokenizer,
  params: Any,
  view: View,
  num_images: int = 8,
  num_codes: int = 8,
  per_code: int = 8,
) -> None:
  """Two pictures of what a tokenizer's codes mean (for VQ-KD, which cannot draw).

  `<kind>_token_maps`: the first `num_images` images (top, 'input') and the code of each
  patch (bottom, 'codes'; one fixed colour per code, as `token_colors`).
  `<kind>_code_patches`: one row per frequent code of all `images`, labelled 'code <id>':
  its colour, then `per_code` patches that get it.

  Args:
    images: [n, S, S, 3] in the tokenizer's `view` (e.g. [-1, 1] for VQ-KD).
  """
  tokens = np.asarray(tokenizer.tokenize(params, jnp.asarray(images)))
  vocab = tokenizer.vocab_size(params)
  pixels = np.clip(view.to_pixels(np.asarray(images, np.float32)), 0, 1)
  k = min(num_images, len(pixels))
  save(
    image_dir,
    writer,
    step,
    f"{tokenizer.kind}_token_maps",
    image_grid([pixels[:k], token_colors(tokens[:k], vocab)], row_labels=["input", "codes"]),
  )
  codes, rows = code_patches(pixels, tokens, num_codes=num_codes, per_code=per_code)
  p = rows[0].shape[1]
  swatches = [np.broadcast_to(token_colors(np.asarray([c]), vocab)[0], (1, p, p, 3)) for c in codes]
  picture = image_grid([np.concatenate([s, r]) for s, r in zip(swatches, rows)])
  scale = max(1, 32 // p)
  save(
    image_dir,
    writer,
    step,
    f"{tokenizer.kind}_code_patches",
    label_grid(
      upscale(picture, scale),
      [f"code {c}" for c in codes],
      row_height=picture.shape[0] // len(codes) * scale,
      col_width=picture.shape[1] // (1 + per_code) * scale,
    ),
  )


def segmentation_colors(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """int class maps [...] -> [..., 3]: `token_colors`' fixed palette, grey where a pixel is
  no class (255: ignored)."""
  labels = np.asarray(labels)
  valid = labels < num_classes
  colours = token_colors(np.where(valid, labels, 0), num_classes)
  return np.where(valid[..., None], colours, np.float32(0.5))


def write_segmentation_images(
  image_dir: epath.Path,
  writer,
  step: int,
  samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
  *,
  num_classes: int,
) -> None:
  """One row per validation image: the image, the predicted classes, the true classes
  (columns labelled 'image', 'prediction', 'truth').

  Args:
    samples: (image uint8 [H, W, 3], prediction int [H, W], label int [H, W]) triples, of
      any sizes (drawn at the largest one's, nearest neighbour; small ones enlarged).
  """
  if not samples:
    return
  h = max(s[0].shape[0] for s in samples)
  w = max(s[0].shape[1] for s in samples)
  rows = []
  for image, pred, label in samples:
    row = [
      image.astype(np.float32) / 255.0,
      segmentation_colors(pred, num_classes),
      segmentation_colors(label, num_classes),
    ]
    rows.append(np.stack([_resize_nearest(x, h, w) for x in row]))
  scale, pad = max(1, 256 // h), 2  # image_grid's default gap
  save(
    image_dir,
    writer,
    step,
    "segmentation",
    label_grid(
      upscale(image_grid(rows, pad), scale),
      col_labels=["image", "prediction", "truth"],
      row_height=(h + pad) * scale,
      col_width=(w + pad) * scale,
    ),
  )
