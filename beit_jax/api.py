"""The Python front door: load a BEiT model from any checkpoint, run it on images, train.

  import beit_jax
  model = beit_jax.load("/tmp/beit_tiny")     # a workdir, a unilm .pth, a HF folder, ...
  out = model.features(images)                 # uint8 or [0, 1] float, [B, H, W, 3] or [H, W, 3]
  pred = model.predict_masked(images, beit_jax.make_mask(model.grid, seed=0))
  beit_jax.train("configs/beit_tiny_local.py", "/tmp/beit_tiny")   # what the CLI runs

`load` reads a beit-jax run's workdir or a converter's output, a microsoft/unilm BEiT /
BEiT v2 / VQ-KD `.pth`, a HuggingFace BEiT `save_pretrained` folder, or OpenAI's DALL-E
folder (`encoder.pkl`, `decoder.pkl`): foreign weights go through the converters of
`beit_jax.convert` in memory. The `Model` it returns holds the config, the params and
jitted functions; images are cut and normalised as the model's run saw them at evaluation
(the largest centred square, or the fine-tuning recipe's centre crop; the resize method
and value range of its view). Results come back as NumPy arrays. The page for users:
docs/api.md.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools
import importlib.util
import json
import os
import sys
import tempfile
from typing import Any

# gs:// paths through epath's fsspec backend, as `beit_jax.main` sets them (see there).
os.environ.setdefault("EPATH_USE_TF", "false")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from beit_jax import logs
from beit_jax.data import masking
from beit_jax import params as params_lib
from beit_jax import tokenizers
from beit_jax.training import visuals
from beit_jax.convert import dalle
from beit_jax.convert import hf
from beit_jax.convert import unilm
from beit_jax.convert import vqkd as vqkd_convert
from beit_jax.data import embedded
from beit_jax.data import views
from beit_jax.errors import ConfigError
from beit_jax.errors import Preempted
from beit_jax.models import vit
from beit_jax.params import vit as vit_params

_TORCH_FILES = (".pth", ".pt", ".bin", ".ckpt")
_EXPECTED = (
  "a beit-jax workdir or checkpoint (config.json + checkpoints/), a HuggingFace BEiT "
  "folder (config.json + model.safetensors or pytorch_model.bin), a DALL-E folder "
  "(encoder.pkl, decoder.pkl) or a unilm .pth file"
)
# PIL's filters for the views' resize methods.
_RESAMPLE = {
  "bicubic": Image.Resampling.BICUBIC,
  "bilinear": Image.Resampling.BILINEAR,
  "lanczos3": Image.Resampling.LANCZOS,
  "lanczos5": Image.Resampling.LANCZOS,
  "nearest": Image.Resampling.NEAREST,
  "area": Image.Resampling.BOX,
}
_DALLE_VIEW = 112  # BEiT's tokenizer view of a 224-pixel image (a 14x14 token grid)
_MAX_BATCH = 64  # images per call of a jitted function (batches are cut and padded to this)


# ------------------------------------------------------------------------------ images


def example_images(max_side: int | None = None) -> list[np.ndarray]:
  """The 20 photos bundled with scikit-image and scikit-learn, uint8 [H, W, 3] (sizes vary)."""
  return [np.asarray(x) for x in embedded.load_embedded_images(max_side)]


def _as_list(images: Any) -> list[np.ndarray]:
  """[B, H, W, 3], [H, W, 3] or a list of [H, W, 3] -> a list of uint8 [H, W, 3]."""
  if isinstance(images, (list, tuple)):
    items = [np.asarray(x) for x in images]
  else:
    array = np.asarray(images)
    items = [array] if array.ndim == 3 else list(array) if array.ndim == 4 else [array]
  if not items:
    raise ValueError("images: got none; pass [B, H, W, 3], [H, W, 3] or a list of [H, W, 3]")
  out = []
  for x in items:
    if x.ndim != 3 or x.shape[-1] != 3:
      raise ValueError(
        f"images: got shape {x.shape}; pass RGB images as [B, H, W, 3], "
        "[H, W, 3] or a list of [H, W, 3]"
      )
    if x.dtype == np.uint8:
      out.append(x)
    elif np.issubdtype(x.dtype, np.floating):
      lo, hi = float(np.min(x)), float(np.max(x))
      if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
          f"images: float pixels must be in [0, 1], got values in "
          f"[{lo:.3g}, {hi:.3g}]; pass uint8 for 0..255"
        )
      out.append(visuals.to_uint8(x))
    else:
      raise ValueError(f"images: dtype {x.dtype}; pass uint8 (0..255) or floats in [0, 1]")
  return out


def _cut(pixels: np.ndarray, size: int, resize: str, crop_pct: float) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 1]: the evaluation view's cut.

  The centred square of side crop_pct * the shorter side (the largest one at 1.0: the
  pictures of pretraining; fine-tuning's evaluation resizes the shorter side to
  size / crop_pct and cuts `size` from the centre, the same window), resized with `resize`.
  """
  h, w = pixels.shape[:2]
  side = max(1, round(min(h, w) * crop_pct))
  top, left = (h - side) // 2, (w - side) // 2
  square = Image.fromarray(np.ascontiguousarray(pixels[top : top + side, left : left + side]))
  return np.asarray(square.resize((size, size), _RESAMPLE[resize]), np.float32) / 255.0


def _pad_batches(n: int) -> list[tuple[int, int, int]]:
  """(start, stop, padded size) of each call: at most _MAX_BATCH images, padded to a power
  of two so that few batch sizes are compiled."""
  out = []
  for start in range(0, n, _MAX_BATCH):
    stop = min(n, start + _MAX_BATCH)
    out.append((start, stop, min(_MAX_BATCH, 1 << (stop - start - 1).bit_length())))
  return out


def _batched(fn, *arrays: np.ndarray) -> Any:
  """fn(*arrays) in padded chunks along axis 0; the outputs (a pytree) concatenated."""
  results = []
  for start, stop, size in _pad_batches(len(arrays[0])):
    chunk = [
      np.concatenate([a[start:stop], np.zeros((size - (stop - start),) + a.shape[1:], a.dtype)])
      for a in arrays
    ]
    out = jax.device_get(fn(*chunk))
    results.append(jax.tree.map(lambda x, k=stop - start: np.asarray(x)[:k], out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *results)


# --------------------------------------------------------------------- jitted functions


@functools.partial(jax.jit, static_argnames=("model", "block"))
def _features(params, images, *, model: vit.VisionTransformer, block: int):
  if block == model.depth - 1:  # after the final norm: what the heads read
    tokens = model.apply({"params": params}, images)["tokens"]
  else:
    tokens = model.apply({"params": params}, images, return_hidden=(block,))["hidden"][block]
  return {"cls": tokens[:, 0], "patches": tokens[:, 1:], "pooled": jnp.mean(tokens[:, 1:], axis=1)}


@functools.partial(jax.jit, static_argnames="model")
def _predict_masked(params, images, mask, *, model: vit.VisionTransformer):
  logits = model.apply({"params": params}, images, mask)["mim_logits"]
  return logits, jnp.argmax(logits, -1)


@functools.partial(jax.jit, static_argnames=("model", "block"))
def _attention(params, images, *, model: vit.VisionTransformer, block: int):
  return model.apply({"params": params}, images, return_attention=True)["attention"][block]


@functools.partial(jax.jit, static_argnames="model")
def _classify(params, images, *, model: vit.VisionTransformer):
  logits = model.apply({"params": params}, images)["logits"]
  return logits, jax.nn.softmax(logits, -1)


@functools.partial(jax.jit, static_argnames="tokenizer")
def _tokenize(params, images, *, tokenizer: tokenizers.Tokenizer):
  return tokenizer.tokenize(params, images)


@functools.partial(jax.jit, static_argnames="tokenizer")
def _decode(params, tokens, *, tokenizer: tokenizers.Tokenizer):
  return jnp.clip(tokenizer.decode(params, tokens), 0.0, 1.0)


# ------------------------------------------------------------------------------- Model


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A loaded model: a ViT, a visual tokenizer, or both (a MIM run and its tokenizer).

  Attributes:
    source: what it was loaded from.
    config: the run's config (a beit-jax workdir), else what the converter read off the
      weights ({'vit': model fields} or {'tokenizer': fields}, as its config.json has them).
    vit: the `VisionTransformer` (None for a tokenizer alone).
    params: the ViT's params, on the default device.
    view: the ViT's input (size, resize method, normalisation).
    crop_pct: the share of the shorter side the centred square cut keeps (fine-tuning's
      `input.eval_crop_pct`; 1.0 otherwise).
    tokenizer: the visual tokenizer (`beit_jax.tokenizers.Tokenizer`) or None.
    tokenizer_params: its params.
    tokenizer_view: its input.
  """

  source: str
  config: ml_collections.ConfigDict = dataclasses.field(repr=False)
  vit: vit.VisionTransformer | None = dataclasses.field(default=None, repr=False)
  params: Any = dataclasses.field(default=None, repr=False)
  view: views.View | None = None
  crop_pct: float = 1.0
  tokenizer: tokenizers.Tokenizer | None = dataclasses.field(default=None, repr=False)
  tokenizer_params: Any = dataclasses.field(default=None, repr=False)
  tokenizer_view: views.View | None = None

  def __repr__(self) -> str:
    parts = [f"source={self.source!r}"]
    if self.vit is not None:
      m = self.vit
      heads = ([f"MIM head ({m.vocab_size})"] if m.vocab_size else []) + (
        [f"classifier ({m.num_classes} classes)"] if m.num_classes else []
      )
      parts.append(
        f"vit={m.depth} blocks x {m.width} wide, {m.num_heads} heads, "
        f"{self.grid[0]}x{self.grid[1]} patches of {m.patch_size} px"
        + "".join(f", {h}" for h in heads)
      )
    if self.tokenizer is not None:
      parts.append(
        f"tokenizer={self.tokenizer.entry.name} with {self.vocab_size} codes, "
        f"{self.tokenizer_view.size} px"
      )
    return f"Model({', '.join(parts)})"

  # --------------------------------------------------------------------- what it is
  @property
  def image_size(self) -> int:
    """The side of the ViT's input (the tokenizer's if there is no ViT)."""
    return (self.view or self.tokenizer_view).size

  @property
  def grid(self) -> tuple[int, int]:
    """(rows, cols) of the ViT's patches (of the tokenizer's tokens if there is no ViT)."""
    if self.vit is not None:
      return self.vit.grid
    side = tokenizers.entry(self.tokenizer.kind).grid(self._tokenizer_input())
    return side, side

  @property
  def vocab_size(self) -> int:
    """The number of visual tokens (the tokenizer's, else the MIM head's)."""
    if self.tokenizer is not None:
      return self.tokenizer.vocab_size(self.tokenizer_params)
    return self._need_vit("vocab_size").vocab_size

  def _tokenizer_input(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
      dict(
        tokenizer_image_size=self.tokenizer_view.size,
        patch_size=self.tokenizer.model.patch_size if self.tokenizer.kind == "vqkd" else 0,
      )
    )

  def _need_vit(self, method: str) -> vit.VisionTransformer:
    if self.vit is None:
      raise ValueError(
        f"{method}: {self.source} holds a {self.tokenizer.entry.name} "
        "tokenizer, no ViT; load a ViT checkpoint for this"
      )
    return self.vit

  def _need_tokenizer(self, method: str) -> tokenizers.Tokenizer:
    if self.tokenizer is None:
      raise ValueError(
        f"{method}: {self.source} has no visual tokenizer; load one (a dVAE "
        "or VQ-KD workdir, DALL-E's folder, a unilm VQ-KD .pth) or pass "
        "load(..., tokenizer=PATH)"
      )
    return self.tokenizer

  # -------------------------------------------------------------------------- inputs
  def pixels(self, images: Any, size: int | None = None) -> np.ndarray:
    """float32 [B, S, S, 3] in [0, 1]: the images cut as the model sees them (for pictures).

    S is the ViT's input size, else the tokenizer's, unless `size` is given.
    """
    view = self.view or self.tokenizer_view
    return np.stack(
      [_cut(x, size or view.size, view.resize, self.crop_pct) for x in _as_list(images)]
    )

  def _inputs(self, images: Any, view: views.View) -> np.ndarray:
    """The model input of `view`: cut, resized and normalised as the run's evaluation."""
    cut = [_cut(x, view.size, view.resize, self.crop_pct) for x in _as_list(images)]
    return np.asarray(view.to_model(np.stack(cut)), np.float32)

  def _block(self, block: int, method: str) -> int:
    depth = self._need_vit(method).depth
    if not isinstance(block, (int, np.integer)) or not -depth <= block < depth:
      raise ValueError(
        f"{method}: block={block!r} must be in {-depth}..{depth - 1} (the ViT "
        f"has {depth} blocks; negative counts from the end)"
      )
    return int(block) % depth

  def _mask(self, mask: Any, batch: int) -> np.ndarray:
    """bool [B, N] from a [h, w] / [N] mask (every image) or [B, h, w] / [B, N] masks."""
    (h, w), m = self.grid, np.asarray(mask)
    if m.dtype != bool:
      if not np.isin(m, (0, 1)).all():
        raise ValueError("predict_masked: mask must be bool (True: masked) or 0/1")
      m = m.astype(bool)
    n = h * w
    if m.shape in ((h, w), (n,)):
      m = np.broadcast_to(m.reshape(1, n), (batch, n))
    elif m.shape in ((batch, h, w), (batch, n)):
      m = m.reshape(batch, n)
    else:
      raise ValueError(
        f"predict_masked: mask has shape {m.shape}; expected {(h, w)} or "
        f"{(n,)} (every image), or one per image: {(batch, h, w)}"
      )
    return np.ascontiguousarray(m)

  # ----------------------------------------------------------------------- the ViT
  def features(self, images: Any, block: int = -1) -> dict[str, np.ndarray]:
    """Features of a block's output (0-based; -1: the last, after the final LayerNorm).

    Returns:
      {'patches': [B, N, D] (row-major patches), 'cls': [B, D], 'pooled': [B, D] (the mean
      of the patch features)}.
    """
    model = self._need_vit("features")
    block = self._block(block, "features")
    fn = functools.partial(_features, self.params, model=model, block=block)
    return _batched(fn, self._inputs(images, self.view))

  def predict_masked(self, images: Any, mask: Any) -> dict[str, np.ndarray]:
    """What the MIM head predicts where `mask` hides the patches (BEiT's pretraining task).

    Args:
      images: as for `features`.
      mask: bool, True where a patch is masked: [h, w] or [N] for every image, or
        [B, h, w] / [B, N] (e.g. from `make_mask`).

    Returns:
      {'logits': [B, N, V] at every patch, 'tokens': int32 [B, h, w] (their argmax),
      'mask': bool [B, h, w]}; `out['tokens'][out['mask']]` are the ids predicted at the
      masked patches.
    """
    model = self._need_vit("predict_masked")
    if not model.vocab_size:
      raise ValueError(
        f"predict_masked: the ViT from {self.source} has no MIM head "
        "(lm_head); load a pretraining checkpoint"
      )
    inputs = self._inputs(images, self.view)
    mask = self._mask(mask, len(inputs))
    fn = functools.partial(_predict_masked, self.params, model=model)
    logits, tokens = _batched(fn, inputs, mask)
    shape = (len(inputs),) + self.grid
    return {"logits": logits, "tokens": tokens.reshape(shape), "mask": mask.reshape(shape)}

  def attention(
    self,
    images: Any,
    block: int = -1,
    head: int | None = None,
    patch: tuple[int, int] | None = None,
  ) -> np.ndarray:
    """Self-attention (softmax) of one block, over [CLS] (index 0) and the patches.

    Args:
      images: as for `features`.
      block: 0-based block (negative: from the end).
      head: one head, or None for all.
      patch: (row, col) of a query patch: then only where it attends among the patches.

    Returns:
      [B, heads, N+1, N+1], or [B, N+1, N+1] for one head; with `patch`, [B, heads, h, w]
      or [B, h, w].
    """
    model = self._need_vit("attention")
    block = self._block(block, "attention")
    if head is not None and not (
      isinstance(head, (int, np.integer)) and -model.num_heads <= head < model.num_heads
    ):
      raise ValueError(
        f"attention: head={head!r} must be in 0..{model.num_heads - 1} or None (all heads)"
      )
    fn = functools.partial(_attention, self.params, model=model, block=block)
    att = _batched(fn, self._inputs(images, self.view))  # [B, H, N+1, N+1]
    if patch is not None:
      (h, w), (r, c) = self.grid, patch
      if not (0 <= r < h and 0 <= c < w):
        raise ValueError(f"attention: patch={patch} is outside the {h}x{w} patch grid")
      att = att[:, :, 1 + r * w + c, 1:].reshape(att.shape[:2] + (h, w))
    return att if head is None else att[:, head]

  def classify(self, images: Any) -> dict[str, np.ndarray]:
    """A fine-tuned model's classes: {'logits': [B, C], 'probs': [B, C], 'label': [B]}."""
    model = self._need_vit("classify")
    if not model.num_classes:
      raise ValueError(
        f"classify: the ViT from {self.source} has no classification head "
        "(a pretraining checkpoint); fine-tune it first "
        "(configs/finetune_*.py)"
      )
    fn = functools.partial(_classify, self.params, model=model)
    logits, probs = _batched(fn, self._inputs(images, self.view))
    return {"logits": logits, "probs": probs, "label": np.argmax(logits, -1)}

  # ----------------------------------------------------------------- the tokenizer
  def tokenize(self, images: Any) -> np.ndarray:
    """int32 [B, h, w]: the visual tokens of the images (the tokenizer's view of them)."""
    tokenizer = self._need_tokenizer("tokenize")
    fn = functools.partial(_tokenize, self.tokenizer_params, tokenizer=tokenizer)
    return _batched(fn, self._inputs(images, self.tokenizer_view))

  def decode(self, tokens: Any) -> np.ndarray:
    """int [B, h, w] (or [h, w]) tokens -> the tokenizer's pictures, [B, S, S, 3] in [0, 1]."""
    tokenizer = self._need_tokenizer("decode")
    if tokenizer.entry.decode is None:
      raise ValueError(
        f"decode: a {tokenizer.entry.name} tokenizer cannot draw tokens (its "
        "decoder reconstructs teacher features, not pixels)"
      )
    if "decoder" not in self.tokenizer_params:
      raise ValueError(
        f"decode: the {tokenizer.entry.name} from {self.source} has no "
        "decoder (converted from encoder.pkl alone)"
      )
    t = np.asarray(tokens)
    t = t[None] if t.ndim == 2 else t
    if t.ndim != 3 or not np.issubdtype(t.dtype, np.integer):
      raise ValueError(
        f"decode: tokens must be integer [B, h, w] or [h, w], got {t.dtype} {t.shape}"
      )
    if t.size and (t.min() < 0 or t.max() >= self.vocab_size):
      raise ValueError(f"decode: token ids must be in 0..{self.vocab_size - 1}")
    fn = functools.partial(_decode, self.tokenizer_params, tokenizer=tokenizer)
    return _batched(fn, t.astype(np.int32))

  # --------------------------------------------------------------------------- masks
  def make_mask(self, seed: int | None = None, **spec) -> np.ndarray:
    """A mask of the ViT's grid as its run drew them (`config.input.mask`), bool [h, w];
    `spec` overrides fields (see `make_mask`)."""
    mask_cfg = self.config.get("input", {}).get("mask") if "input" in self.config else None
    given = dict(mask_cfg.items()) if mask_cfg is not None else {}
    return make_mask(self.grid, seed=seed, **dict(given, **spec))


def make_mask(
  grid: int | tuple[int, int] = 14,
  num_masking_patches: int | None = None,
  *,
  kind: str = "blockwise",
  min_num_patches: int | None = None,
  max_num_patches: int | None = None,
  min_aspect: float = 0.3,
  max_aspect: float | None = None,
  exact: bool = False,
  seed: int | np.random.Generator | None = None,
) -> np.ndarray:
  """One mask of BEiT's blockwise masking (unilm's MaskingGenerator), bool [h, w].

  Args:
    grid: patches per side, or (rows, cols).
    num_masking_patches: how many to mask; default BEiT's 75 of 196 scaled to the grid.
    kind: 'blockwise' or 'random' (exactly num_masking_patches uniform patches).
    min_num_patches: smallest block (default 16, at most num_masking_patches).
    max_num_patches, min_aspect, max_aspect, exact: as `input.mask` of the configs
      (`exact`: BEiT v2's exact count).
    seed: an int, a NumPy Generator, or None (fresh randomness).
  """
  rows, cols = (grid, grid) if isinstance(grid, (int, np.integer)) else tuple(grid)
  n = round(75 * rows * cols / 196) if num_masking_patches is None else num_masking_patches
  n = max(1, n)
  spec = masking.MaskSpec(
    kind=kind,
    grid=(int(rows), int(cols)),
    num_masking_patches=n,
    min_num_patches=min(16, n) if min_num_patches is None else min_num_patches,
    max_num_patches=max_num_patches,
    min_aspect=min_aspect,
    max_aspect=max_aspect,
    exact=exact,
  )
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
  return masking.make_mask_np(spec, rng).reshape(rows, cols)


# ------------------------------------------------------------------------------- load


def _read_json(path: epath.Path) -> dict | None:
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not JSON ({e})") from None


def _config_dict(raw: dict) -> ml_collections.ConfigDict:
  def tuples(x):  # configs hold tuples, which JSON wrote as lists
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x

  return ml_collections.ConfigDict(tuples(raw))


def _device(tree: Any) -> Any:
  return jax.device_put(jax.tree.map(jnp.asarray, tree))


def _without_decoder(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Flat params without v2's patch-aggregation decoder, which serves pretraining only."""
  return {k: v for k, v in params.items() if not fnmatch.fnmatchcase(k, params_lib.DECODER)}


def _vit_parts(
  params: dict[str, np.ndarray], kw: dict[str, Any], image_size: int | None, what: str
) -> tuple[vit.VisionTransformer, Any]:
  """The ViT of flat params and model fields; position parameters resized to image_size."""
  if image_size and image_size != kw["image_size"]:
    params, kw = vit_params.adapt(params, kw, image_size=image_size)
  params = _without_decoder(params)
  kw = unilm.without_patch_aggregation(kw)  # v2's decoder serves pretraining only
  vit_params.check(params, kw, what)
  return vit.VisionTransformer(**kw), _device(vit_params.nested(params))


def _beit_jax_vit(
  path: str, raw: dict | None, image_size: int | None, num_heads: int | None
) -> tuple[vit.VisionTransformer, Any]:
  what = f"beit-jax checkpoint {path}"
  params = _without_decoder(vit_params.read(path))
  kw = vit_params.infer_model_kwargs(
    params, what, config=raw, num_heads=num_heads, fallback_image_size=image_size
  )
  return _vit_parts(params, kw, image_size, what)


def _tokenizer_config(fields: dict[str, Any]) -> ml_collections.ConfigDict:
  """`config.tokenizer` of a converter's tokenizer fields."""
  tok = {k: v for k, v in fields.items() if k != "image_size"}
  if tok.get("kind") == "vqkd":
    tok.setdefault("beta", 1.0)  # the commitment loss's weight: training only
  return ml_collections.ConfigDict(tok)


def _tokenizer_view(tok: ml_collections.ConfigDict, size: int) -> views.View:
  inp = ml_collections.ConfigDict(
    dict(tokenizer_image_size=size, patch_size=tok.get("patch_size", 0))
  )
  return tokenizers.entry(tok.kind).view(inp)


def _checked_tokenizer(
  tok: ml_collections.ConfigDict, params: Any, what: str
) -> tuple[tokenizers.Tokenizer, Any]:
  tokenizer = tokenizers.build(tok)
  tokenizers.check_kind(tok.kind, params, what)
  params = tokenizer.entry.check_params(tokenizer.model, params, what)
  return tokenizer, _device(params)


def _tokenizer_dir(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Where a MIM run's tokenizer is: `tokenizer.init_from`, or `<workdir>/tokenizer`."""
  from beit_jax import trainers  # the dispatch: a trainer module is never imported here

  if trainers.module("mim").predicts_pixels(config):
    return None
  path = trainers.module("mim").tokenizer_dir(config, workdir)
  return path if epath.Path(path).exists() else None


def _from_beit_jax(
  path: str, root: epath.Path, image_size: int | None, num_heads: int | None
) -> Model:
  """A run's workdir (config.json with a trainer), a converter's output, a step folder."""
  raw = _read_json(root / "config.json")
  config = _config_dict(raw or {})
  trainer = config.get("trainer")
  if trainer in ("dvae", "vqkd"):
    tokenizer, params = tokenizers.load(config.tokenizer, path, field=path)
    return Model(
      path,
      config,
      tokenizer=tokenizer,
      tokenizer_params=_device(params),
      tokenizer_view=tokenizers.view(config),
    )
  if trainer in ("linear_probe", "segmentation"):
    hint = (
      f"load its backbone ({config.get('init_from') or 'config.init_from'})"
      if trainer == "linear_probe"
      else "load the checkpoint its backbone started from"
    )
    raise ValueError(
      f"{path} is a {trainer} run: beit_jax.load reads ViTs, classifiers and tokenizers; {hint}"
    )
  if raw is not None and "tokenizer" in raw and "vit" not in raw and not trainer:
    tok = _tokenizer_config(raw["tokenizer"])  # a converted DALL-E or VQ-KD
    params = params_lib.read(path)
    tokenizer, params = _checked_tokenizer(tok, params, path)
    size = image_size or raw["tokenizer"].get("image_size") or _DALLE_VIEW
    return Model(
      path,
      config,
      tokenizer=tokenizer,
      tokenizer_params=params,
      tokenizer_view=_tokenizer_view(tok, size),
    )
  model, params = _beit_jax_vit(path, raw, image_size, num_heads)
  crop = float(config.input.get("eval_crop_pct", 1.0)) if trainer == "finetune" else 1.0
  out = Model(
    path, config, vit=model, params=params, view=views.vit_view(model.image_size), crop_pct=crop
  )
  if trainer == "mim":
    tok_path = _tokenizer_dir(config, path)
    if tok_path is not None:
      tokenizer, tok_params = tokenizers.load(config.tokenizer, tok_path, field=tok_path)
      out = dataclasses.replace(
        out,
        tokenizer=tokenizer,
        tokenizer_params=_device(tok_params),
        tokenizer_view=tokenizers.view(config),
      )
  return out


def _paired_view(
  tok: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer, model: vit.VisionTransformer
) -> views.View:
  """The tokenizer's view whose token grid is the ViT's patch grid (what MIM pairs)."""
  return _tokenizer_view(tok, model.grid[0] * tokenizer.entry.image_multiple(tok))


def _localized(path: str, tmp: str) -> str:
  """A remote (gs://) file or folder of foreign weights, copied to `tmp` for torch/PIL."""
  p = epath.Path(path)
  if not path.startswith("gs://"):
    return path
  if p.is_file():
    local = os.path.join(tmp, p.name)
    epath.Path(local).write_bytes(p.read_bytes())
    return local
  local = os.path.join(tmp, p.name or "folder")
  os.makedirs(local, exist_ok=True)
  for child in p.iterdir():
    if child.is_file():
      epath.Path(os.path.join(local, child.name)).write_bytes(child.read_bytes())
  return local


def _from_unilm(path: str, source: str, image_size: int | None, num_heads: int | None) -> Model:
  what = f"unilm checkpoint {source}"
  sd, _ = unilm.load_checkpoint(path)
  if vqkd_convert.is_vqkd(sd):
    variables, fields = vqkd_convert.load(
      sd, f"unilm VQ-KD checkpoint {source}", num_heads=num_heads
    )
    tok = _tokenizer_config(fields)
    tokenizer, params = _checked_tokenizer(tok, variables, source)
    return Model(
      source,
      ml_collections.ConfigDict({"tokenizer": fields}),
      tokenizer=tokenizer,
      tokenizer_params=params,
      tokenizer_view=_tokenizer_view(tok, image_size or fields["image_size"]),
    )
  kw = unilm.infer_model_kwargs(sd, what, num_heads=num_heads, fallback_image_size=image_size)
  params = unilm.to_params(sd, kw, what)
  model, params = _vit_parts(params, kw, image_size, what)
  return Model(
    source,
    ml_collections.ConfigDict({"vit": dict(kw)}),
    vit=model,
    params=params,
    view=views.vit_view(model.image_size),
  )


def _from_hf(path: str, source: str, image_size: int | None) -> Model:
  params, kw = hf.load(path)
  model, params = _vit_parts(params, kw, image_size, f"HF folder {source}")
  return Model(
    source,
    ml_collections.ConfigDict({"vit": dict(kw)}),
    vit=model,
    params=params,
    view=views.vit_view(model.image_size),
  )


def _from_dalle(path: str, source: str, image_size: int | None) -> Model:
  folder = epath.Path(path) if epath.Path(path).is_dir() else epath.Path(path).parent
  params, fields = dalle.load(str(folder), encoder_only=not (folder / "decoder.pkl").exists())
  tok = _tokenizer_config(fields)
  tokenizer, params = _checked_tokenizer(tok, params, source)
  return Model(
    source,
    ml_collections.ConfigDict({"tokenizer": fields}),
    tokenizer=tokenizer,
    tokenizer_params=params,
    tokenizer_view=_tokenizer_view(tok, image_size or _DALLE_VIEW),
  )


def _kind(p: epath.Path) -> str:
  """'beit_jax', 'hf', 'dalle' or 'unilm' for what is at `p` (which exists)."""
  if p.is_file():
    if p.name in ("encoder.pkl", "decoder.pkl"):
      return "dalle"
    if p.suffix in _TORCH_FILES:
      return "unilm"
  elif (p / "encoder.pkl").exists():
    return "dalle"
  elif (p / "state").is_dir() or (p / "checkpoints").is_dir():
    return "beit_jax"
  elif (p / "config.json").exists() and any(
    (p / f).exists()
    for f in (
      "model.safetensors",
      "pytorch_model.bin",
      "model.safetensors.index.json",
      "pytorch_model.bin.index.json",
    )
  ):
    return "hf"
  raise ValueError(f"{p} is not a model beit_jax.load reads; expected {_EXPECTED}")


def load(
  source: str | os.PathLike,
  *,
  tokenizer: str | os.PathLike | None = None,
  image_size: int | None = None,
  num_heads: int | None = None,
) -> Model:
  """A model from a checkpoint of any kind beit-jax reads (see the module docstring).

  Args:
    source: a beit-jax workdir (a MIM run's comes with its tokenizer), a converter's output
      folder or a step folder `<workdir>/checkpoints/<step>`; a unilm BEiT / BEiT v2 / VQ-KD
      `.pth`; a HuggingFace BEiT folder; DALL-E's folder (`encoder.pkl`, `decoder.pkl`).
      Local, Drive-mounted, or gs://.
    tokenizer: a tokenizer to pair with a ViT (for `tokenize`/`decode` beside
      `predict_masked`), e.g. DALL-E's folder for a unilm BEiT v1 checkpoint.
    image_size: resize a ViT's position parameters to this input size (its own by
      default); for a tokenizer alone, its view's size (DALL-E: 112 by default).
    num_heads: for ViT weights that do not tell (no relative position table).

  Raises:
    FileNotFoundError: `source` does not exist.
    ValueError: `source` is none of these, or its weights do not fit (one line).
  """
  source = os.fspath(source)
  p = epath.Path(source)
  if not p.exists():
    raise FileNotFoundError(f"{source} does not exist; expected {_EXPECTED}")
  kind = _kind(p)
  with tempfile.TemporaryDirectory() as tmp:
    if kind == "beit_jax":
      root = p.parent.parent if (p / "state").is_dir() else p  # a step folder's workdir
      model = _from_beit_jax(source, root, image_size, num_heads)
    else:
      local = _localized(source, tmp)
      if kind == "unilm":
        model = _from_unilm(local, source, image_size, num_heads)
      elif kind == "hf":
        model = _from_hf(local, source, image_size)
      else:
        if not source.startswith("gs://"):
          model = _from_dalle(local, source, image_size)
        else:  # both pickles
          folder = source if p.is_dir() else str(p.parent)
          model = _from_dalle(_localized(folder, tmp), source, image_size)
  if tokenizer is not None:
    model = _paired(model, load(tokenizer))
  return model


def _paired(model: Model, other: Model) -> Model:
  if model.vit is None:
    raise ValueError(f"load(tokenizer=...): {model.source} holds no ViT to pair it with")
  if other.tokenizer is None:
    raise ValueError(f"load(tokenizer={other.source!r}) holds no visual tokenizer")
  vocab = other.tokenizer.vocab_size(other.tokenizer_params)
  if model.vit.vocab_size and vocab != model.vit.vocab_size:
    raise ValueError(
      f"load(tokenizer={other.source!r}): {vocab} codes, but the MIM head of "
      f"{model.source} predicts {model.vit.vocab_size}"
    )
  tok = other.config.get("tokenizer") or ml_collections.ConfigDict({"kind": other.tokenizer.kind})
  tok = _tokenizer_config(dict(tok))
  view = _paired_view(tok, other.tokenizer, model.vit)
  return dataclasses.replace(
    model, tokenizer=other.tokenizer, tokenizer_params=other.tokenizer_params, tokenizer_view=view
  )


# ------------------------------------------------------------------------------ train


def _config_root(path: epath.Path) -> str | None:
  """The folder holding `configs/`, so that a config file's `from configs import ...` works."""
  folder = path.resolve().parent
  return str(folder.parent) if folder.name == "configs" else None


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> its `get_config(arg)`, as `--config=` reads it.

  A relative path is looked up in the working directory, then in the checkout beit_jax
  is imported from (so "configs/beit_tiny_local.py" works from any folder).
  """
  file, _, arg = os.fspath(spec).partition(":")
  candidates = [epath.Path(file)]
  if not os.path.isabs(file):
    candidates.append(epath.Path(__file__).parent.parent / file)
  path = next((c for c in candidates if c.is_file()), None)
  if path is None:
    raise FileNotFoundError(
      f"config {file} does not exist (looked in {', '.join(str(c) for c in candidates)})"
    )
  root = _config_root(path)
  if root and root not in sys.path:
    sys.path.insert(0, root)
  name = f"beit_jax_config_{abs(hash(str(path.resolve())))}"
  module_spec = importlib.util.spec_from_file_location(name, str(path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config {file} defines no get_config(arg)")
  return module.get_config(arg) if arg else module.get_config()


def _override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """`--config.<key>=value` on a locked config: an unknown field is an error, as there."""
  *parents, leaf = key.split(".")
  node = config
  for i, part in enumerate(parents):
    node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(
        f"overrides: {key} is not a field of the config "
        f"({'.'.join(parents[: i + 1])} is no section)"
      )
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ConfigError(f"overrides: {key} is not a field of the config")
  if isinstance(node[leaf], tuple) and isinstance(value, list):
    value = tuple(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"overrides: {key}={value!r}: {' '.join(str(e).split())}") from None


def train(
  config: str | ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  overrides: dict[str, Any] | None = None,
) -> dict[str, float]:
  """Runs what `python -m beit_jax.main --config=CONFIG --workdir=WORKDIR` runs.

  The same checks before any compute, the same resume from the workdir's latest checkpoint
  (a finished run returns at once), the same outputs (config.json, checkpoints/,
  TensorBoard events, images/); a progress bar on a terminal and in a notebook.

  Args:
    config: a config file 'configs/X.py' or 'configs/X.py:arg' (as `--config=`), or a
      ConfigDict (copied, not changed).
    workdir: local path, Drive folder or gs://.
    overrides: {'total_steps': 100, 'input.batch_size': 16}: as `--config.<key>=<value>`
      (an unknown key is an error).

  Returns:
    the run's last metrics.

  Raises:
    ConfigError (a ValueError): a bad field, file or data set, in one line, before compute.
    TrainingError: the run cannot go on (e.g. too many non-finite steps).
  """
  from beit_jax.trainers import run  # the dispatch, as `beit_jax.main` calls it

  config = load_config(config) if isinstance(config, (str, os.PathLike)) else copy.deepcopy(config)
  config.lock()  # as --config= locks it: overrides name existing fields only
  for key, value in (overrides or {}).items():
    _override(config, key, value)
  logs.quiet_libraries()
  try:
    return run(config, os.fspath(workdir))
  except Preempted as e:  # stopped as asked, its state saved: not an error (as the CLI)
    print(f"beit_jax: {e}", file=sys.stderr, flush=True)
    return {}


__all__ = ["Model", "example_images", "load", "load_config", "make_mask", "train"]
