"""UperNet on the BEiT backbone (unilm `beit/semantic_segmentation`, mmseg's UPerHead).

The ViT's outputs of four blocks (`out_indices`, e.g. 3, 5, 7, 11 for B) become a pyramid at
strides 4, 8, 16 and 32 of the image, as unilm's backbone does for 16x16 patches (fpn1:
ConvTranspose 2x2/2, norm, GELU, ConvTranspose 2x2/2; fpn2: one ConvTranspose; fpn3: the
map itself; fpn4: 2x2 max pooling) and for 8x8 patches (one ConvTranspose, identity, 2x2 and
4x4 max pooling). The UperNet head runs a pyramid pooling module (scales 1, 2, 3, 6) on the
coarsest level, FPN laterals with a top-down path, 3x3 convolutions and a fused 3x3
convolution; an auxiliary FCN head reads the third level (stride 16). Logits are
bilinearly upsampled to the image (align_corners=False, as mmseg).

Normalisation: GroupNorm wherever mmseg has SyncBN. Linen's BatchNorm would need running
statistics in the train state (which holds params and optimizer state only) and a
cross-device mean (mmseg uses SyncBN because each GPU sees 2 images); GroupNorm has neither,
behaves the same in training and evaluation, and is the usual replacement at small
per-device batches.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beit_jax.models import paths as param_paths
from beit_jax.models import vit

# Strides of the four pyramid levels, relative to the image.
LEVEL_STRIDES = (4, 8, 16, 32)
_GN_EPS = 1e-5
# mmcv ConvModule's kaiming_init (fan_out, normal) for the head's convolutions; mmseg's
# cls_seg starts at normal(0.01).
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_SEG_INIT = nn.initializers.normal(0.01)
# Sharding (`param_paths`): the backbone's weights are the ViT's; the neck's and heads'
# convolutions and norms have no roles (sharded by size).
PARAM_AXES = param_paths.nested("backbone", vit.PARAM_AXES)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[B, h, w, C] -> [B, *size, C]: torch's bilinear with align_corners=False (no antialias
  when shrinking, as F.interpolate)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), "bilinear", antialias=False)


def _adaptive_pool_matrix(n: int, out: int) -> np.ndarray:
  """[out, n] averaging weights of torch's AdaptiveAvgPool over one axis (bins may overlap,
  and repeat when out > n)."""
  m = np.zeros((out, n), np.float32)
  for i in range(out):
    lo, hi = (i * n) // out, math.ceil((i + 1) * n / out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool(x: jax.Array, out: int) -> jax.Array:
  """[B, h, w, C] -> [B, out, out, C], torch's AdaptiveAvgPool2d(out)."""
  ph = jnp.asarray(_adaptive_pool_matrix(x.shape[1], out))
  pw = jnp.asarray(_adaptive_pool_matrix(x.shape[2], out))
  return jnp.einsum("oh,bhwc,pw->bopc", ph, x.astype(jnp.float32), pw).astype(x.dtype)


class ConvModule(nn.Module):
  """mmcv's ConvModule: conv (no bias) -> GroupNorm -> ReLU."""

  features: int
  kernel: int
  norm_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(
      self.features,
      (self.kernel,) * 2,
      padding="SAME",
      use_bias=False,
      kernel_init=_CONV_INIT,
      dtype=self.dtype,
      name="conv",
    )(x)
    x = nn.GroupNorm(self.norm_groups, epsilon=_GN_EPS, dtype=jnp.float32, name="gn")(x)
    return nn.relu(x).astype(self.dtype)


class Pyramid(nn.Module):
  """One stride-`patch_size` map per level -> maps at strides 4, 8, 16, 32 (unilm's fpn1..4).

  A level finer than the patch is reached by 2x2/2 transposed convolutions (with norm and
  GELU between two of them), a coarser one by max pooling.
  """

  patch_size: int
  norm_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
    """features: 4 x [B, h, w, D] -> [B, h * p / s, w * p / s, D] for s in LEVEL_STRIDES."""
    out = []
    for level, (x, stride) in enumerate(zip(features, LEVEL_STRIDES)):
      d = x.shape[-1]
      if stride < self.patch_size:
        for k in range(int(math.log2(self.patch_size // stride))):
          if k:
            x = nn.GroupNorm(
              self.norm_groups, epsilon=_GN_EPS, dtype=jnp.float32, name=f"fpn{level + 1}_gn"
            )(x)
            x = nn.gelu(x, approximate=False).astype(self.dtype)
          x = nn.ConvTranspose(
            d,
            (2, 2),
            strides=(2, 2),
            padding="VALID",
            dtype=self.dtype,
            name=f"fpn{level + 1}_deconv{k}",
          )(x)
      elif stride > self.patch_size:
        k = stride // self.patch_size
        x = nn.max_pool(x, (k, k), strides=(k, k))
      out.append(x)
    return out


# The backbone patch sizes the pyramid takes: its strides are reached by factors of 2.
PATCH_SIZES = (4, 8, 16, 32)


class PPM(nn.Module):
  """mmseg's pyramid pooling module + bottleneck: x and its average pools to each scale
  (1x1 conv, upsampled back), concatenated, through a 3x3 conv."""

  channels: int
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  norm_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, h, w, D] -> [B, h, w, channels]."""
    outs = [x]
    for scale in self.pool_scales:
      y = ConvModule(self.channels, 1, self.norm_groups, self.dtype, name=f"psp_{scale}")(
        adaptive_avg_pool(x, scale)
      )
      outs.append(resize_bilinear(y, x.shape[1:3]))
    return ConvModule(self.channels, 3, self.norm_groups, self.dtype, name="bottleneck")(
      jnp.concatenate(outs, axis=-1)
    )


class UperHead(nn.Module):
  """mmseg's UPerHead: PPM on the coarsest level, FPN, fused 3x3 conv, dropout, 1x1 classes."""

  channels: int
  num_classes: int
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  dropout: float = 0.1
  norm_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array], train: bool = False) -> jax.Array:
    """levels: finest first. Returns logits [B, h0, w0, num_classes] at the finest level."""
    laterals = [
      ConvModule(self.channels, 1, self.norm_groups, self.dtype, name=f"lateral_{i}")(x)
      for i, x in enumerate(levels[:-1])
    ]
    laterals.append(
      PPM(self.channels, tuple(self.pool_scales), self.norm_groups, self.dtype, name="ppm")(
        levels[-1]
      )
    )
    for i in range(len(laterals) - 1, 0, -1):  # top-down
      laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
    outs = [
      ConvModule(self.channels, 3, self.norm_groups, self.dtype, name=f"fpn_{i}")(x)
      for i, x in enumerate(laterals[:-1])
    ] + [laterals[-1]]
    size = outs[0].shape[1:3]
    fused = jnp.concatenate([resize_bilinear(x, size) for x in outs], axis=-1)
    x = ConvModule(self.channels, 3, self.norm_groups, self.dtype, name="fpn_bottleneck")(fused)
    return _classify(x, self.num_classes, self.dropout, train, self.dtype)


class FCNHead(nn.Module):
  """mmseg's FCNHead with num_convs=1, concat_input=False: the auxiliary head."""

  channels: int
  num_classes: int
  dropout: float = 0.1
  norm_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = ConvModule(self.channels, 3, self.norm_groups, self.dtype, name="conv")(x)
    return _classify(x, self.num_classes, self.dropout, train, self.dtype)


def _classify(x: jax.Array, num_classes: int, dropout: float, train: bool, dtype) -> jax.Array:
  """mmseg's cls_seg: Dropout2d (whole channels) then a 1x1 conv; float32 logits."""
  x = nn.Dropout(dropout, broadcast_dims=(1, 2))(x, deterministic=not train)
  return nn.Conv(num_classes, (1, 1), kernel_init=_SEG_INIT, dtype=dtype, name="conv_seg")(
    x
  ).astype(jnp.float32)


class Segmenter(nn.Module):
  """BEiT backbone -> pyramid -> UperNet (+ auxiliary FCN head on level 3).

  Attributes:
    backbone: the ViT (no heads); its blocks `out_indices` feed the pyramid.
  """

  backbone: vit.VisionTransformer
  out_indices: tuple[int, ...]
  num_classes: int
  channels: int = 768
  aux_channels: int = 256
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  dropout: float = 0.1
  norm_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, images: jax.Array, *, train: bool = False, return_pyramid: bool = False
  ) -> dict[str, Any]:
    """Args: images [B, S, S, 3] (S = the backbone's image_size).

    Returns:
      'logits' and 'aux_logits' [B, S, S, num_classes] (float32); 'pyramid' (4 maps, finest
      first) if asked.
    """
    name = type(self).__name__
    if len(self.out_indices) != len(LEVEL_STRIDES):
      raise ValueError(
        f"{name}: out_indices {tuple(self.out_indices)} must name "
        f"{len(LEVEL_STRIDES)} blocks, one per pyramid level"
      )
    if self.backbone.patch_size not in PATCH_SIZES:
      raise ValueError(
        f"{name}: backbone patch_size {self.backbone.patch_size} is not one "
        f"of {PATCH_SIZES} (the pyramid's strides 4..32 are powers of 2 of it)"
      )
    b = images.shape[0]
    hidden = self.backbone(images, train=train, return_hidden=tuple(self.out_indices))["hidden"]
    h, w = self.backbone.grid
    features = [
      hidden[i][:, 1:].reshape(b, h, w, -1).astype(self.dtype)  # [B, h, w, D]
      for i in self.out_indices
    ]
    pyramid = Pyramid(self.backbone.patch_size, self.norm_groups, self.dtype, name="neck")(features)
    logits = UperHead(
      self.channels,
      self.num_classes,
      tuple(self.pool_scales),
      self.dropout,
      self.norm_groups,
      self.dtype,
      name="decode_head",
    )(pyramid, train)
    aux = FCNHead(
      self.aux_channels,
      self.num_classes,
      self.dropout,
      self.norm_groups,
      self.dtype,
      name="auxiliary_head",
    )(pyramid[2], train)
    size = images.shape[1:3]
    out = {"logits": resize_bilinear(logits, size), "aux_logits": resize_bilinear(aux, size)}
    if return_pyramid:
      out["pyramid"] = pyramid
    return out
