r"""Look inside trained models: self-attention maps of a ViT, token maps of a dVAE.

  python -m beit_jax.visualize --checkpoint=/tmp/beit_tiny --images=embedded --out=/tmp/vis \
      --layers=all --heads=all --ref_patches='center;1,1'
  python -m beit_jax.visualize --tokenizer=/tmp/beit_tiny --images='photos/*.jpg' --out=/tmp/vis

Attention (`--checkpoint`, a run's workdir or a converter's output): one PNG per image and
reference patch, `<name>_attention_r<row>c<col>.png`, a grid whose rows are the chosen
heads and then their layer's mean over all heads, and whose columns are the chosen layers
(labelled in the picture: 'head 3', 'mean'; 'layer 11', 0-based).
Each cell is the image (in grey) with the attention of the reference patch (green box)
to every patch in red, scaled so that the cell's most attended patch is full red (the paper's
self-attention figure; [CLS] is left out of the picture but in the softmax).

Tokens (`--tokenizer`, a dVAE workdir, a run's workdir (its `tokenizer/` is used) or a
converted DALL-E folder): one PNG per image, `<name>_tokens.png`: the image, its token
map (one fixed colour per token id, the same in every picture) and the dVAE's
reconstruction from those tokens, each column labelled above it.

Images are cut like the evaluation view of pretraining: the largest centred square,
resized (bicubic for the ViT, Lanczos for the tokenizer) to the model's input size.
"""

import dataclasses
import functools
import glob as globlib
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from etils import epath
from PIL import Image

from beit_jax.training import checkpoint
from beit_jax import logs
from beit_jax import params as params_lib
from beit_jax import tokenizers
from beit_jax.training import visuals
from beit_jax.training import workdir
from beit_jax.data import embedded
from beit_jax.data import views
from beit_jax.errors import ConfigError
from beit_jax.models import vit

_CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  None,
  "ViT to draw attention maps of: a run's workdir or a converted "
  "checkpoint (a folder with config.json and checkpoints/).",
)
_TOKENIZER = flags.DEFINE_string(
  "tokenizer",
  None,
  "dVAE to draw token maps of: its workdir, a MIM run's workdir (uses "
  "its tokenizer/) or a converted DALL-E folder.",
)
_IMAGES = flags.DEFINE_string(
  "images",
  None,
  "Image files, folders or globs (comma-separated), or 'embedded' for the "
  "20 photos bundled with scikit-image/scikit-learn.",
)
_OUT = flags.DEFINE_string("out", None, "Folder the PNGs go to (local path or gs://).")
_LAYERS = flags.DEFINE_string(
  "layers",
  "all",
  "'all' or comma-separated 0-based block "
  "indices (negative count from the end), e.g. 0,5,11 or -1.",
)
_HEADS = flags.DEFINE_string("heads", "all", "'all' or comma-separated 0-based head indices.")
_REF_PATCHES = flags.DEFINE_string(
  "ref_patches",
  "center",
  "Reference patches: 'center' or 'row,col' patch coordinates, "
  "several separated by ';', e.g. 'center;0,0;3,5'.",
)
_IMAGE_SIZE = flags.DEFINE_integer(
  "image_size",
  None,
  "Tokenizer input size (a multiple of 8; default: the config's "
  "input.tokenizer_image_size). A ViT's size is fixed by its position parameters: "
  "if given it must match.",
)

# Small inputs (e.g. 32 or 64 pixels) are enlarged by an integer factor to at least this.
MIN_CELL_PIXELS = 128
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Photo:
  """An input image; files are read when drawn, so a big folder is never all in memory."""

  name: str  # file stem (made unique), or embedded_<i>
  source: epath.Path | np.ndarray  # a file, or uint8 [H, W, 3] pixels

  def pixels(self) -> np.ndarray:
    if isinstance(self.source, np.ndarray):
      return self.source
    return _read_image(self.source)


def _read_image(path: epath.Path) -> np.ndarray:
  try:
    with path.open("rb") as f:
      return np.asarray(Image.open(f).convert("RGB"))
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
      f"--images: cannot read {path} as an image ({type(e).__name__}: {e})"
    ) from None


def _image_paths(spec: str) -> list[epath.Path]:
  """One comma-separated part of --images: a file, a folder (its image files) or a glob."""
  path = epath.Path(spec)
  if path.is_dir():
    found = sorted(
      p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not found:
      raise ConfigError(
        f"--images: folder {spec} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
      )
    return found
  if path.exists():
    return [path]
  found = sorted(p for p in globlib.glob(spec) if epath.Path(p).is_file())
  if not found:
    raise ConfigError(f"--images: {spec} is no file or folder and matches no files as a glob")
  return [epath.Path(p) for p in found]


def find_images(spec: str) -> list[Photo]:
  """The photos --images names, in order, with unique names for the output files."""
  if not spec:
    raise ConfigError("--images is empty; pass files, folders, globs or 'embedded'")
  photos, used = [], set()
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    if part == "embedded":
      named = [(f"embedded_{i:02d}", x) for i, x in enumerate(embedded.load_embedded_images())]
    else:
      named = [(p.stem, p) for p in _image_paths(part)]
    for name, source in named:
      unique, k = name, 1
      while unique in used:
        unique, k = f"{name}_{k}", k + 1
      used.add(unique)
      photos.append(Photo(unique, source))
  if not photos:
    raise ConfigError(f"--images={spec} names no images")
  return photos


def center_crop_resize(
  pixels: np.ndarray, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 1]: largest centred square, resized.

  The same cut as pretraining's picture batch (`data.pretrain.make_eval_batch`), i.e.
  the shorter side resized to `size` and the longer one centre-cropped.
  """
  h, w = pixels.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  square = Image.fromarray(np.ascontiguousarray(pixels[top : top + side, left : left + side]))
  return np.asarray(square.resize((size, size), resample), np.float32) / 255.0


def normalize(images: np.ndarray) -> np.ndarray:
  """[0, 1] -> the ViT's input (ImageNet mean/std)."""
  return (images - np.asarray(views.IMAGENET_MEAN, np.float32)) / np.asarray(
    views.IMAGENET_STD, np.float32
  )


def _indices(spec: str, count: int, flag: str, what: str) -> list[int]:
  """'all' or comma-separated indices into range(count) (negative from the end)."""
  if spec.strip() == "all":
    return list(range(count))
  try:
    values = [int(v) for v in spec.split(",") if v.strip()]
  except ValueError:
    raise ConfigError(f"{flag}={spec!r}: expected 'all' or comma-separated integers") from None
  bad = [v for v in values if not -count <= v < count]
  if bad or not values:
    raise ConfigError(
      f"{flag}={spec!r}: {what} indices must be in 0..{count - 1} "
      f"(or -{count}..-1 from the end); the model has {count}"
    )
  return [v % count for v in values]


def parse_layers(spec: str, depth: int) -> list[int]:
  return _indices(spec, depth, "--layers", "block")


def parse_heads(spec: str, num_heads: int) -> list[int]:
  return _indices(spec, num_heads, "--heads", "head")


def parse_ref_patches(spec: str, grid: int) -> list[tuple[int, int]]:
  """'center' or 'row,col' items separated by ';' -> (row, col) patch coordinates."""
  refs = []
  for item in (s.strip() for s in spec.split(";") if s.strip()):
    if item == "center":
      refs.append((grid // 2, grid // 2))
      continue
    try:
      r, c = (int(v) for v in item.split(","))
    except ValueError:
      raise ConfigError(f"--ref_patches={spec!r}: {item!r} is not 'center' or 'row,col'") from None
    if not (0 <= r < grid and 0 <= c < grid):
      raise ConfigError(
        f"--ref_patches={spec!r}: patch ({r},{c}) is outside the "
        f"{grid}x{grid} patch grid (rows and columns 0..{grid - 1})"
      )
    refs.append((r, c))
  if not refs:
    raise ConfigError(f"--ref_patches={spec!r}: expected 'center' or 'row,col;row,col...'")
  return list(dict.fromkeys(refs))


def _load_config(path: str, flag: str) -> ml_collections.ConfigDict:
  if not epath.Path(path).exists():
    raise ConfigError(f"{flag}={path} does not exist")
  if not (epath.Path(path) / "config.json").exists():
    raise ConfigError(
      f"{flag}={path} has no config.json (a run's workdir and a converter's output folder hold one)"
    )
  return workdir.load_config(path)


def build_vit(path: str) -> vit.VisionTransformer:
  """The ViT of a run's config.json (its `model`), or of a converter's (its `vit` fields)."""
  config = _load_config(path, "--checkpoint")
  if "vit" in config:
    return vit.VisionTransformer(**config.vit.to_dict())
  if "model" not in config or "input" not in config:
    raise ConfigError(
      f"--checkpoint={path}: config.json describes no ViT (no 'model' and "
      "'input', nor a converter's 'vit')"
    )
  return vit.from_config(
    config.model, image_size=config.input.image_size, vocab_size=config.tokenizer.vocab_size
  )


def load_vit_params(path: str, model: vit.VisionTransformer) -> Any:
  size = model.image_size
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))["params"]
  )
  # v2's patch-aggregation decoder (`cls_pt_layers_<j>`) is not part of the backbone drawn.
  return params_lib.load_into(abstract, path, field="--checkpoint", drop=(params_lib.DECODER,))


@functools.partial(jax.jit, static_argnames=("model", "refs", "layers"))
def reference_attention(
  params: Any,
  images: jax.Array,
  *,
  model: vit.VisionTransformer,
  refs: tuple[int, ...],
  layers: tuple[int, ...],
) -> jax.Array:
  """Attention rows of the reference patches.

  Args:
    params: the ViT's params.
    images: [B, S, S, 3] normalised ViT input.
    model: the ViT.
    refs: patch indices (row-major, without [CLS]).
    layers: 0-based block indices.

  Returns:
    float32 [B, len(layers), heads, len(refs), N+1]: softmax over [CLS] + patches.
  """
  att = model.apply({"params": params}, images, return_attention=True)["attention"]
  rows = np.asarray(refs) + 1  # [CLS] is token 0
  return jnp.stack([att[i][:, :, rows] for i in layers], 1)


def cell_scale(size: int) -> int:
  """Integer enlargement of a size-pixel image to at least MIN_CELL_PIXELS."""
  return max(1, math.ceil(MIN_CELL_PIXELS / size))


def attention_picture(
  image: np.ndarray, rows: np.ndarray, ref: int, heads: list[int], layers: list[int]
) -> np.ndarray:
  """The grid of one image and reference patch.

  Args:
    image: [S, S, 3] in [0, 1], drawn in grey.
    rows: [L, H, N+1] the reference patch's attention in each chosen layer and every head.
    ref: the reference patch index.
    heads: the heads to draw (one grid row each), before the row of the mean over all heads.
    layers: the L block indices of `rows`, for the column labels.

  Returns:
    [top + (len(heads) + 1) * (C + 2), left + L * (C + 2), 3] with C = S * cell_scale(S):
    rows labelled 'head <h>' and 'mean', columns 'layer <l>' (`visuals.label_margins`' top
    and left margins).
  """
  grid = math.isqrt(rows.shape[-1] - 1)
  # Grey under the red heat, so that red in the photo does not read as attention.
  cell = visuals.upscale(visuals.grayscale(image), cell_scale(image.shape[0]))
  att = rows[:, :, 1:]  # [L, H, N]
  picture_rows = []
  for heat in [att[:, h] for h in heads] + [att.mean(1)]:  # [L, N] each
    heat = heat / np.maximum(heat.max(1, keepdims=True), 1e-12)
    cells = visuals.heat_overlay(np.broadcast_to(cell, (len(heat),) + cell.shape), heat)
    picture_rows.append(visuals.outline_patch(cells, ref, grid))
  return visuals.image_grid(
    picture_rows,
    row_labels=[f"head {h}" for h in heads] + ["mean"],
    col_labels=[f"layer {i}" for i in layers],
  )


@dataclasses.dataclass(frozen=True)
class AttentionJob:
  """What --checkpoint, --layers, --heads and --ref_patches ask for, checked."""

  path: str
  model: vit.VisionTransformer
  layers: list[int]
  heads: list[int]
  refs: list[tuple[int, int]]  # (row, col) patch coordinates


def attention_job(
  path: str, *, layers: str, heads: str, ref_patches: str, image_size: int | None
) -> AttentionJob:
  """Reads only config.json, so bad flags fail before any weights are loaded."""
  model = build_vit(path)
  if image_size is not None and image_size != model.image_size:
    raise ConfigError(
      f"--image_size={image_size}, but the ViT at {path} takes "
      f"{model.image_size}x{model.image_size} images (its position parameters "
      "fix it; `python -m beit_jax.convert --image_size` resizes them)"
    )
  return AttentionJob(
    path,
    model,
    parse_layers(layers, model.depth),
    parse_heads(heads, model.num_heads),
    parse_ref_patches(ref_patches, model.grid[0]),
  )


def write_attention_maps(
  job: AttentionJob, photos: list[Photo], out: epath.Path
) -> list[epath.Path]:
  """One PNG per photo and reference patch; returns their paths."""
  model, grid = job.model, job.model.grid[0]
  params = load_vit_params(job.path, model)
  logging.info(
    "ViT from %s: %d blocks, %d heads, %dx%d patches; layers %s, heads %s, reference patches %s",
    job.path,
    model.depth,
    model.num_heads,
    grid,
    grid,
    job.layers,
    job.heads,
    job.refs,
  )
  refs = [r * grid + c for r, c in job.refs]
  written = []
  for photo in photos:
    image = center_crop_resize(photo.pixels(), model.image_size)
    rows = np.asarray(
      reference_attention(
        params,
        jnp.asarray(normalize(image[None])),
        model=model,
        refs=tuple(refs),
        layers=tuple(job.layers),
      )
    )[0]  # [L, H, R, N+1]
    for k, (r, c) in enumerate(job.refs):
      target = out / f"{photo.name}_attention_r{r}c{c}.png"
      visuals.write_png(
        target, attention_picture(image, rows[:, :, k], refs[k], job.heads, job.layers)
      )
      written.append(target)
  return written


def _tokenizer_dir(path: str) -> str:
  """A MIM run's workdir -> its tokenizer/ (where stage 1 trained); else unchanged."""
  sub = epath.Path(path) / "tokenizer"
  return str(sub) if (sub / "config.json").exists() else path


def load_tokenizer(path: str) -> tuple[tokenizers.Tokenizer, Any]:
  """(tokenizer, params) of a tokenizer checkpoint; params may lack a decoder."""
  path = _tokenizer_dir(path)
  config = _load_config(path, "--tokenizer")
  if "tokenizer" not in config:
    raise ConfigError(f"--tokenizer={path}: config.json has no 'tokenizer' section")
  return tokenizers.load(config.tokenizer, path, field="--tokenizer")


# PIL's filters for the views' resize methods.
_PIL_RESAMPLE = {
  "bicubic": Image.Resampling.BICUBIC,
  "bilinear": Image.Resampling.BILINEAR,
  "lanczos3": Image.Resampling.LANCZOS,
  "lanczos5": Image.Resampling.LANCZOS,
  "nearest": Image.Resampling.NEAREST,
  "area": Image.Resampling.BOX,
}


def tokenizer_view(path: str, image_size: int | None) -> views.View:
  """The tokenizer's input view at --image_size, else at the size it was trained at."""
  config = _load_config(_tokenizer_dir(path), "--tokenizer")
  size = image_size or config.get("input", {}).get("tokenizer_image_size")
  if not size:
    raise ConfigError(
      f"--tokenizer={path}: config.json sets no input.tokenizer_image_size; "
      "pass --image_size (e.g. 112, BEiT's tokenizer view)"
    )
  kind = tokenizers.entry(config.tokenizer.kind)
  if size % kind.image_multiple(config.tokenizer):
    raise ConfigError(
      f"--image_size={size}: the {kind.name} needs a multiple of "
      f"{kind.image_multiple(config.tokenizer)}"
    )
  inp = ml_collections.ConfigDict(dict(config.get("input", {}), tokenizer_image_size=size))
  return kind.view(inp)


def token_picture(
  image: np.ndarray,
  tokens: np.ndarray,
  recon: np.ndarray | None,
  vocab_size: int,
  name: str = "dVAE",
) -> np.ndarray:
  """[image | token colours | reconstruction] of one image, enlarged like the attention cells,
  the columns labelled 'image', 'tokens' and '<name> recon.' (a top margin).

  Args:
    image: [T, T, 3] in [0, 1].
    tokens: int [h, w].
    recon: [T, T, 3] in [0, 1], or None (no decoder).
    vocab_size: number of token ids (fixes the palette).
    name: the tokenizer's name, for the reconstruction's label.
  """
  k = cell_scale(image.shape[0])
  colors = visuals.upscale(
    visuals.token_colors(tokens, vocab_size), k * image.shape[0] // tokens.shape[0]
  )
  cells = [visuals.upscale(image, k), colors] + (
    [] if recon is None else [visuals.upscale(recon, k)]
  )
  labels = ["image", "tokens", f"{name} recon."][: len(cells)]
  return visuals.image_grid([np.stack(cells)], col_labels=labels)


@functools.partial(jax.jit, static_argnames="tokenizer")
def tokens_and_reconstruction(
  params: Any, images: jax.Array, *, tokenizer: tokenizers.Tokenizer
) -> tuple[jax.Array, jax.Array | None]:
  """[B, T, T, 3] tokenizer input -> tokens [B, h, w] and their decoding (None: no decoder)."""
  tokens = tokenizer.tokenize(params, images)
  return tokens, tokenizer.decode(params, tokens)


def write_token_maps(
  path: str, photos: list[Photo], out: epath.Path, view: views.View
) -> list[epath.Path]:
  """One PNG per photo, the tokenizer seeing it through `view`; returns their paths."""
  tokenizer, params = load_tokenizer(path)
  written = []
  for photo in photos:
    image = center_crop_resize(photo.pixels(), view.size, _PIL_RESAMPLE[view.resize])
    tokens, recon = jax.device_get(
      tokens_and_reconstruction(
        params, jnp.asarray(view.to_model(image)[None]), tokenizer=tokenizer
      )
    )
    if recon is None and not written:
      logging.warning("--tokenizer=%s has no decoder: the token maps have no reconstruction", path)
    logging.info("%s: %d distinct tokens among %d", photo.name, len(np.unique(tokens)), tokens.size)
    target = out / f"{photo.name}_tokens.png"
    visuals.write_png(
      target,
      token_picture(
        image,
        tokens[0],
        None if recon is None else recon[0],
        tokenizer.vocab_size(params),
        tokenizer.entry.name,
      ),
    )
    written.append(target)
  return written


def run(
  *,
  images: str,
  out: str,
  checkpoint_dir: str | None = None,
  tokenizer_dir: str | None = None,
  layers: str = "all",
  heads: str = "all",
  ref_patches: str = "center",
  image_size: int | None = None,
) -> list[epath.Path]:
  """Writes the attention maps and/or token maps; returns the PNG paths."""
  if not checkpoint_dir and not tokenizer_dir:
    raise ConfigError("pass --checkpoint (attention maps) and/or --tokenizer (token maps)")
  if not out:
    raise ConfigError("--out is required: the folder the PNGs go to")
  # Flags and config files first: mistakes fail before any weights are read.
  job = (
    attention_job(
      checkpoint_dir, layers=layers, heads=heads, ref_patches=ref_patches, image_size=image_size
    )
    if checkpoint_dir
    else None
  )
  tok_view = tokenizer_view(tokenizer_dir, image_size) if tokenizer_dir else None
  photos = find_images(images)
  checkpoint.check_writable(out, "--out")
  written = []
  if job:
    written += write_attention_maps(job, photos, epath.Path(out))
  if tokenizer_dir:
    written += write_token_maps(tokenizer_dir, photos, epath.Path(out), tok_view)
  logging.info("Wrote %d PNG files to %s", len(written), out)
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_libraries()
  try:
    run(
      images=_IMAGES.value,
      out=_OUT.value,
      checkpoint_dir=_CHECKPOINT.value,
      tokenizer_dir=_TOKENIZER.value,
      layers=_LAYERS.value,
      heads=_HEADS.value,
      ref_patches=_REF_PATCHES.value,
      image_size=_IMAGE_SIZE.value,
    )
  except ConfigError as e:
    sys.exit(f"beit_jax: error: {e}")


if __name__ == "__main__":
  app.run(main)
