"""Frozen teachers whose patch features BEiT v2's VQ-KD tokenizer learns to reconstruct.

Two towers plus beit-jax's own ViT:
- `ClipVisionTower`: OpenAI CLIP's image encoder (also HF `CLIPVisionModel`). Its
  target is every patch token after `ln_post`, projected by `proj` ([CLS] dropped),
  e.g. [B, 196, 512] for ViT-B/16 at 224.
- `DinoViT`: the DINO ViT (timm / HF `ViTModel` architecture). Its target is every
  patch token after the final norm, e.g. [B, 196, 768].
- `vit_teacher`: a beit-jax `VisionTransformer`'s patch tokens, of any block.

Parameter names mirror the PyTorch sources (OpenAI `visual.*` for CLIP:
`conv1`, `resblocks_0/attn/in_proj`, `ln_post`, `proj`; DINO's timm names:
`patch_embed`, `blocks_0/attn/qkv`, `norm`) so converters are renames and
transposes. Each teacher sees images normalised with the statistics it was
trained with. That mapping is a view, not model code: `Teacher.normalization`
names the `beit_jax.data.views.NORMALIZATIONS` entry ("clip" for CLIP,
"imagenet" for DINO and beit-jax ViTs), the input pipeline produces the
teacher's view of each crop, and `Teacher.features` takes images already in it.

Precision: Dense/Conv compute in `dtype`; parameters, LayerNorm, attention softmax
and returned features are float32.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beit_jax.models import vit

# Sharding (`param_paths`): DINO keeps the ViT's (timm's) names, so the ViT's roles apply
# (its fused qkv [D, 3D] matches none and is sharded by size); CLIP's weights have no roles.
# A beit-jax ViT teacher: vit.PARAM_AXES.
DINO_PARAM_AXES = vit.PARAM_AXES
CLIP_PARAM_AXES = ()


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x); its weights expect it."""
  return x * jax.nn.sigmoid(1.702 * x)


def _check(module: nn.Module, images: jax.Array) -> int:
  """The number of patches N of `module`'s images, after its sizes and `images`' shape
  are checked (ValueErrors naming the module's attribute or the array's shape)."""
  name, width, heads, s = (type(module).__name__, module.width, module.num_heads, module.image_size)
  if heads < 1 or width % heads:
    raise ValueError(f"{name}: width {width} is not divisible by num_heads {heads}")
  try:
    n = vit.num_patches(s, module.patch_size)
  except ValueError as e:
    raise ValueError(f"{name}: {e}") from None
  if images.shape[1:] != (s, s, 3):
    raise ValueError(
      f"{name}: images {list(images.shape)}: expected [B, {s}, {s}, 3] (image_size {s})"
    )
  return n


def _embed(x: jax.Array, conv: nn.Module, cls: jax.Array, pos: jax.Array) -> jax.Array:
  """Patch embedding, [CLS] in front, absolute positions added: [B, N+1, D] float32."""
  b = x.shape[0]
  x = conv(x)  # [B, h, w, D]
  x = x.reshape(b, -1, x.shape[-1]).astype(jnp.float32)  # [B, N, D]
  cls = jnp.broadcast_to(cls.reshape(1, 1, -1), (b, 1, x.shape[-1]))
  return jnp.concatenate([cls, x], axis=1) + pos.reshape(1, *pos.shape[-2:])


class SelfAttention(nn.Module):
  """Multi-head self-attention with biases on q, k, v from one fused projection.

  The two projections' names are fields so each teacher keeps its source's names
  (CLIP: in_proj / out_proj of nn.MultiheadAttention; DINO: qkv / proj).
  """

  num_heads: int
  qkv_name: str = "qkv"
  out_name: str = "proj"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, name=self.qkv_name)(x)  # [B, T, 3D]
    qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, hd]
    out, _ = vit.dot_product_attention(q, k, v)  # the ViT's: cuDNN's kernel on a GPU
    return nn.Dense(d, dtype=self.dtype, name=self.out_name)(out.reshape(b, t, d))


class Mlp(nn.Module):
  """Dense -> GELU (exact, or CLIP's quick_gelu) -> Dense, with source names."""

  mlp_dim: int
  use_quick_gelu: bool = False
  in_name: str = "fc1"
  out_name: str = "fc2"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, name=self.in_name)(x)
    y = quick_gelu(y) if self.use_quick_gelu else nn.gelu(y, approximate=False)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name=self.out_name)(y)


class Block(nn.Module):
  """Pre-norm block x + attn(LN(x)), x + mlp(LN(x)) (no LayerScale, no drop path).

  `clip_names` picks OpenAI's names (ln_1, attn/in_proj, attn/out_proj, ln_2,
  mlp/c_fc, mlp/c_proj) over timm's (norm1, attn/qkv, attn/proj, norm2,
  mlp/fc1, mlp/fc2).
  """

  num_heads: int
  mlp_dim: int
  layer_norm_eps: float
  use_quick_gelu: bool = False
  clip_names: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.clip_names
    norm1, norm2 = ("ln_1", "ln_2") if c else ("norm1", "norm2")
    y = nn.LayerNorm(self.layer_norm_eps, dtype=jnp.float32, name=norm1)(x)
    y = SelfAttention(
      self.num_heads,
      *(("in_proj", "out_proj") if c else ("qkv", "proj")),
      dtype=self.dtype,
      name="attn",
    )(y)
    x = x + y.astype(jnp.float32)  # [B, T, D]
    y = nn.LayerNorm(self.layer_norm_eps, dtype=jnp.float32, name=norm2)(x)
    y = Mlp(
      self.mlp_dim,
      self.use_quick_gelu,
      *(("c_fc", "c_proj") if c else ("fc1", "fc2")),
      dtype=self.dtype,
      name="mlp",
    )(y)
    return x + y.astype(jnp.float32)


class ClipVisionTower(nn.Module):
  """OpenAI CLIP's VisionTransformer; returns proj(ln_post(patch tokens)).

  OpenAI applies ln_post and proj to [CLS] only (its image embedding); BEiT v2
  distils from the patch tokens passed through the same two, [CLS] dropped.
  Defaults are ViT-B/16 at 224 (mlp_dim = 4 * width, heads = width / 64).
  """

  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  image_size: int = 224
  proj_dim: int = 512
  layer_norm_eps: float = 1e-5
  use_quick_gelu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] normalised images -> [B, N, proj_dim] float32."""
    n = _check(self, images)
    init = nn.initializers.normal(self.width**-0.5)  # OpenAI's scale
    conv = nn.Conv(
      self.width,
      (self.patch_size,) * 2,
      strides=(self.patch_size,) * 2,
      padding="VALID",
      use_bias=False,
      dtype=self.dtype,
      name="conv1",
    )
    cls = self.param("class_embedding", init, (self.width,))
    pos = self.param("positional_embedding", init, (n + 1, self.width))
    x = _embed(images, conv, cls, pos)  # [B, N+1, D]
    x = nn.LayerNorm(self.layer_norm_eps, dtype=jnp.float32, name="ln_pre")(x)
    for i in range(self.depth):
      x = Block(
        self.num_heads,
        self.mlp_dim,
        self.layer_norm_eps,
        self.use_quick_gelu,
        clip_names=True,
        dtype=self.dtype,
        name=f"resblocks_{i}",
      )(x)
    x = nn.LayerNorm(self.layer_norm_eps, dtype=jnp.float32, name="ln_post")(x[:, 1:])
    proj = self.param("proj", init, (self.width, self.proj_dim))  # OpenAI's [D, out]
    return jnp.einsum("bnd,de->bne", x.astype(self.dtype), proj.astype(self.dtype)).astype(
      jnp.float32
    )  # [B, N, out]


class DinoViT(nn.Module):
  """The DINO ViT (timm VisionTransformer); returns norm(patch tokens).

  Defaults are ViT-B/16 at 224; DINO's LayerNorms use eps 1e-6 (converters set
  what a checkpoint's config says).
  """

  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  image_size: int = 224
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] normalised images -> [B, N, width] float32."""
    n = _check(self, images)
    init = nn.initializers.truncated_normal(0.02)
    conv = nn.Conv(
      self.width,
      (self.patch_size,) * 2,
      strides=(self.patch_size,) * 2,
      padding="VALID",
      dtype=self.dtype,
      name="patch_embed",
    )
    cls = self.param("cls_token", init, (1, 1, self.width))
    pos = self.param("pos_embed", init, (1, n + 1, self.width))
    x = _embed(images, conv, cls, pos)  # [B, N+1, D]
    for i in range(self.depth):
      x = Block(
        self.num_heads, self.mlp_dim, self.layer_norm_eps, dtype=self.dtype, name=f"blocks_{i}"
      )(x)
    return nn.LayerNorm(self.layer_norm_eps, dtype=jnp.float32, name="norm")(x[:, 1:])


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen feature extractor: a module plus the name of the input view it expects.

  Hashable, so it can be a static argument of a jitted step.

  Attributes:
    module: ClipVisionTower, DinoViT or a beit-jax VisionTransformer.
    normalization: the `data.views.NORMALIZATIONS` entry of the teacher's training
      inputs ("clip" or "imagenet"); its view is
      `View(image_size, "bicubic", normalization)`.
    block: VisionTransformer only: None for its patch tokens after the final
      norm, else the 0-based block whose output (before the norm) to use.
  """

  module: nn.Module
  normalization: str
  block: int | None = None

  @property
  def image_size(self) -> int:
    return self.module.image_size

  @property
  def num_patches(self) -> int:
    return vit.num_patches(self.module.image_size, self.module.patch_size)

  @property
  def dim(self) -> int:
    """C of the [B, N, C] features (the VQ-KD decoder's output width)."""
    return getattr(self.module, "proj_dim", self.module.width)

  def features(self, params: Any, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] images in the teacher's view -> [B, N, C] float32 targets, no gradient.

    Args:
      params: the module's params (the inner dict, without {'params': ...}).
      images: H = W = image_size, already normalised as `normalization` says
        (the pipeline's teacher view).
    """
    variables, x = {"params": params}, jnp.asarray(images, jnp.float32)
    if not isinstance(self.module, vit.VisionTransformer):
      out = self.module.apply(variables, x)
    elif self.block is None:
      out = self.module.apply(variables, x)["tokens"][:, 1:]  # [B, N, D]
    else:
      out = self.module.apply(variables, x, return_hidden=(self.block,))
      out = out["hidden"][self.block][:, 1:]  # [B, N, D]
    return jax.lax.stop_gradient(out.astype(jnp.float32))

  def init(self, rng: jax.Array) -> Any:
    """Random params of the module (tests, shapes); teachers are loaded in practice."""
    x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    return jax.jit(self.module.init)(rng, x)["params"]

  def param_shapes(self) -> dict[str, Any]:
    """The module's param tree as ShapeDtypeStructs (no compute)."""
    return jax.eval_shape(self.init, jax.random.key(0))


def clip_teacher(**kwargs) -> Teacher:
  """CLIP image tower (ClipVisionTower fields, e.g. from a converter), CLIP's view."""
  return Teacher(ClipVisionTower(**kwargs), "clip")


def dino_teacher(**kwargs) -> Teacher:
  """DINO ViT (DinoViT fields), ImageNet-normalised view."""
  return Teacher(DinoViT(**kwargs), "imagenet")


def vit_teacher(vit_kwargs: dict[str, Any], block: int | None = None) -> Teacher:
  """A beit-jax VisionTransformer checkpoint as teacher, ImageNet-normalised view.

  Its params are those of `VisionTransformer(**vit_kwargs)` as trained (e.g. from
  `params.vit.load`); the target is the patch tokens, [CLS] dropped.

  Args:
    vit_kwargs: the VisionTransformer fields.
    block: None for the tokens after the final norm; else a block index
      (negative counts from the end) whose output, before the final norm, to use.
  """
  model = vit.VisionTransformer(**vit_kwargs)
  if block is not None:
    if not -model.depth <= block < model.depth:
      raise ValueError(
        f"vit_teacher: block {block} is not in {-model.depth}.."
        f"{model.depth - 1} (depth {model.depth})"
      )
    block %= model.depth
  return Teacher(model, "imagenet", block)
