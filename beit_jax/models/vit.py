"""The BEiT vision transformer (docs/reference.md §1) as a pure-functional linen module.

One module covers the pretraining model (MIM head `lm_head`, shared relative
position bias, truncated init) and the fine-tuning model (mean-pooled `fc_norm`
+ `head`, per-block relative position bias, untruncated init); configs pick the
flags. Parameter names mirror microsoft/unilm (`blocks_0/attn/qkv`, `gamma_1`,
`rel_pos_bias/relative_position_bias_table`, ...) so checkpoint converters are
plain renames and transposes.

Precision: Dense/Conv compute in `dtype`; parameters, the residual stream,
LayerNorm, attention softmax and all returned outputs are float32.

Attention (`dot_product_attention`): on a CUDA GPU in bfloat16/float16, cuDNN's fused
kernel through `jax.nn.dot_product_attention`; elsewhere, and whenever the attention
maps are asked for, explicit logits and a float32 softmax under XLA.
"""

import functools
import math
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from beit_jax.models import paths as param_paths

Initializer = Callable[..., jax.Array]

_SIZES = {
  "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
  "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
  "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
  "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
  "H": dict(width=1280, depth=32, num_heads=16, mlp_dim=5120),
}
VARIANTS: dict[str, dict] = {
  "Ti/16": dict(_SIZES["Ti"], patch_size=16),
  "S/16": dict(_SIZES["S"], patch_size=16),
  "B/16": dict(_SIZES["B"], patch_size=16),
  "L/16": dict(_SIZES["L"], patch_size=16),
  "H/14": dict(_SIZES["H"], patch_size=14),
}
_LN_EPS = 1e-6

# Sharding: the logical axes of each weight role (`param_paths`: a regex of the path below
# the module, also found inside optimizer states and under a parent model such as VQ-KD's
# encoder); `sharding.py` maps them onto the mesh. Weights not listed are sharded by size.
BLOCK_PARAM_AXES = (  # a Block's, below the block
  ("attn/qkv/kernel", ("embed", None, "heads")),  # [D, 3, H*hd]
  ("attn/[qv]_bias", ("heads",)),
  ("attn/proj/kernel", ("heads", "embed")),
  ("mlp/fc1/kernel", ("embed", "mlp")),
  ("mlp/fc1/bias", ("mlp",)),
  ("mlp/fc2/kernel", ("mlp", "embed")),
  ("(attn/proj|mlp/fc2)/bias|norm[12]/(scale|bias)|gamma_[12]", ("embed",)),
)
# The subtree of the blocks as one nn.scan (`scan_layers`): every leaf below it is stacked
# [depth, ...], its layer axis never sharded (`params.blocks.stacked_mask`); unscanned, the
# blocks are `blocks_<i>`.
SCANNED_BLOCKS = "blocks"
PARAM_AXES = param_paths.nested(rf"{SCANNED_BLOCKS}(_\d+)?|cls_pt_layers_\d+", BLOCK_PARAM_AXES) + (
  ("patch_embed/kernel", (None, None, None, "embed")),
  ("cls_token|mask_token|pos_embed", (None, None, "embed")),
  ("lm_head/kernel", ("embed", "vocab")),
  ("lm_head/bias", ("vocab",)),
  ("head/kernel", ("embed", "classes")),
  ("patch_embed/bias|(fc_)?norm/(scale|bias)", ("embed",)),
)
# Activations: the residual stream at block boundaries, and per head inside attention.
EMBED_ACT = ("batch", "length", "embed")
_HEADS_ACT = ("batch", "length", "heads", "kv")


def variant_kwargs(variant: str, **overrides) -> dict:
  """VisionTransformer kwargs of a 'Ti|S|B|L|H/<patch>' name, e.g. 'B/16'.

  Args:
    variant: size and patch size, e.g. 'L/16' or 'Ti/8'.
    **overrides: fields to set on top; a value of None means "keep default",
      so config fields left unset can be passed through blindly.

  Returns:
    dict with width, depth, num_heads, mlp_dim, patch_size (+ overrides).
  """
  m = re.fullmatch(r"(Ti|S|B|L|H)/([1-9][0-9]*)", str(variant))
  if m is None:
    raise ValueError(
      f"ViT variant {variant!r}: expected <size>/<patch> with size in "
      f"{'|'.join(_SIZES)}, e.g. {', '.join(VARIANTS)}"
    )
  kwargs = dict(_SIZES[m.group(1)], patch_size=int(m.group(2)))
  kwargs.update({k: v for k, v in overrides.items() if v is not None})
  return kwargs


# What a rematerialised block keeps for the backward pass (jax.checkpoint_policies names):
# nothing (recompute all: least memory), every matmul output, or those without batch dims.
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
# The size fields a config's `model` group may set on top of its variant.
SIZE_FIELDS = ("width", "depth", "num_heads", "mlp_dim")


def size_kwargs(model_cfg: ml_collections.ConfigDict) -> dict:
  """width, depth, num_heads, mlp_dim, patch_size of `config.model` (variant + overrides).

  Its field rules and checks are `beit_jax/training/model_rules.py`'s, run once at start.
  """
  return variant_kwargs(model_cfg.variant, **{k: model_cfg.get(k) for k in SIZE_FIELDS})


def from_config(
  model_cfg: ml_collections.ConfigDict, *, image_size: int, train: bool = False, **kwargs
) -> "VisionTransformer":
  """The ViT `config.model` describes; heads and init options come as `kwargs`.

  Drop path only when `train` (evaluation and frozen backbones run without it).
  """
  m = model_cfg
  return VisionTransformer(
    **size_kwargs(m),
    image_size=image_size,
    use_abs_pos_emb=m.use_abs_pos_emb,
    use_shared_rel_pos_bias=m.use_shared_rel_pos_bias,
    use_rel_pos_bias=m.get("use_rel_pos_bias", False),
    layer_scale_init=m.layer_scale_init,
    drop_path_rate=m.drop_path_rate if train else 0.0,
    remat=m.get("remat", False),
    remat_policy=m.get("remat_policy", REMAT_POLICIES[0]),
    scan_layers=m.get("scan_layers", False),
    dtype=jnp.dtype(m.get("dtype", "float32")),
    **kwargs,
  )


def num_patches(image_size: int, patch_size: int) -> int:
  """Number of patches N of a square image; the grid is N**0.5 per side."""
  if image_size <= 0 or patch_size <= 0 or image_size % patch_size:
    raise ValueError(
      f"image size {image_size} is not a positive multiple of patch size {patch_size}"
    )
  return (image_size // patch_size) ** 2


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
  """Row of the relative-position table for every (query, key) token pair.

  Tokens are [CLS] followed by the patches in row-major order. Patch pairs use
  (dh + h-1) * (2w-1) + (dw + w-1) with d = query coord - key coord; the last
  three rows are cls-to-token, token-to-cls and cls-to-cls (unilm's layout).

  Args:
    grid: (h, w) patch grid.

  Returns:
    int32 [N+1, N+1] numpy array (a compile-time constant).
  """
  h, w = grid
  num_rel = (2 * h - 1) * (2 * w - 1) + 3
  coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"))
  coords = coords.reshape(2, -1)  # [2, N]
  rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N]
  index = np.zeros((h * w + 1,) * 2, np.int32)
  index[1:, 1:] = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
  index[0, :] = num_rel - 3
  index[:, 0] = num_rel - 2
  index[0, 0] = num_rel - 1
  return index


def _num_relative_distance(grid: tuple[int, int]) -> int:
  return (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3


def _gather_rel_pos_bias(table: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """[num_rel, H] table -> [H, N+1, N+1] additive attention bias."""
  index = relative_position_index(grid)
  return jnp.transpose(table[index], (2, 0, 1))


def _weight_init(std: float, truncate: bool) -> Initializer:
  """unilm's trunc_normal_: clipped at ±1 std when pretraining.

  The fine-tuning model calls timm's trunc_normal_ with absolute bounds ±2,
  i.e. ±100 std at std 0.02, so a plain normal is the same distribution.
  """
  if truncate:
    return nn.initializers.truncated_normal(std, lower=-1.0, upper=1.0)
  return nn.initializers.normal(std)


class RelativePositionBias(nn.Module):
  """A relative position bias table, gathered to a [H, N+1, N+1] bias."""

  grid: tuple[int, int]
  num_heads: int

  @nn.compact
  def __call__(self) -> jax.Array:
    table = self.param(
      "relative_position_bias_table",
      nn.initializers.zeros,
      (_num_relative_distance(self.grid), self.num_heads),
    )
    return _gather_rel_pos_bias(table, self.grid)  # [H, N+1, N+1]


ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")
_BIAS_ACT = (None, "heads", None, None)  # [1, H, T, T]: heads split as q's


@functools.cache
def _on_cuda() -> bool:
  """Whether the default backend is a CUDA GPU (cuDNN's fused attention possible)."""
  try:
    if jax.default_backend() != "gpu":
      return False
    from jax.extend import backend  # pylint: disable=g-import-not-at-top

    return "cuda" in backend.get_backend().platform_version.lower()
  except Exception:  # pylint: disable=broad-except
    return False


def attention_implementation(dtype: Any, head_dim: int, return_probs: bool = False) -> str:
  """What `dot_product_attention` runs for these arguments when not told: 'cudnn' on a
  CUDA GPU for bfloat16/float16 at head dims it takes (a multiple of 8, at most 128) and
  without the maps; else 'einsum'."""
  fused = (
    jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    and head_dim % 8 == 0
    and head_dim <= 128
    and not return_probs
  )
  return "cudnn" if fused and _on_cuda() else "einsum"


def _fused_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, implementation: str
) -> jax.Array:
  """`jax.nn.dot_product_attention` ('xla' or 'cudnn') of [B, T, H, hd] q, k, v.

  cuDNN's kernel takes the bias in the compute dtype, and trains with one only at an even
  length: at an odd T (BEiT's N+1) one padding token is appended, masked as a key and
  cut from the output, so it changes nothing but the shapes.
  """
  t = q.shape[1]
  mask = None
  if bias is not None:
    bias = nn.with_logical_constraint(bias.astype(q.dtype)[None], _BIAS_ACT)
    if t % 2:
      pad = ((0, 0), (0, 1), (0, 0), (0, 0))
      q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
      bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 1), (0, 1)))
      mask = jnp.broadcast_to(jnp.arange(t + 1) < t, (1, 1, t + 1, t + 1))
  out = jax.nn.dot_product_attention(
    q, k, v, bias, mask, scale=q.shape[-1] ** -0.5, implementation=implementation
  )
  return out[:, :t]


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  bias: jax.Array | None = None,
  *,
  return_probs: bool = False,
  implementation: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """softmax(q k^T / sqrt(hd) + bias) v per head, the softmax in float32.

  Args:
    q, k, v: [B, T, H, hd] in the compute dtype.
    bias: [H, T, T] float32 added to the logits (relative positions), a sequence of
      them (added one after the other), or None.
    return_probs: also return the softmax (visualisation); only 'einsum' has it.
    implementation: 'einsum' (explicit logits, XLA: the formulation the CPU figures
      were recorded with), 'xla' or 'cudnn' (`jax.nn.dot_product_attention`'s); None
      picks by `attention_implementation`.

  Returns:
    ([B, T, H, hd] in the compute dtype, [B, H, T, T] float32 probabilities or None).
  """
  if implementation is None:
    implementation = attention_implementation(q.dtype, q.shape[-1], return_probs)
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
      f"dot_product_attention: implementation {implementation!r} is not "
      f"one of {ATTENTION_IMPLEMENTATIONS}"
    )
  biases = [] if bias is None else [bias] if hasattr(bias, "shape") else list(bias)
  if implementation != "einsum":
    bias = functools.reduce(jnp.add, biases) if biases else None
    if return_probs:
      raise ValueError(
        f"dot_product_attention: implementation {implementation!r} has "
        "no probabilities (return_probs); use 'einsum'"
      )
    return _fused_attention(q, k, v, bias, implementation), None
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k).astype(jnp.float32)
  for b in biases:
    logits = logits + b
  probs = jax.nn.softmax(logits, axis=-1)  # [B, H, T, T] float32
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v), probs


class Attention(nn.Module):
  """Multi-head self-attention with q/v biases (no k bias), as in BEiT."""

  num_heads: int
  rel_pos_grid: tuple[int, int] | None = None  # own bias table (fine-tuning)
  kernel_init: Initializer = nn.initializers.lecun_normal()
  proj_kernel_init: Initializer = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, rel_pos_bias: jax.Array | None = None, return_probs: bool = False
  ) -> tuple[jax.Array, jax.Array | None]:
    """[B, T, D] -> ([B, T, D], softmax [B, H, T, T] float32, or None where the fused
    kernel ran: always there with `return_probs`)."""
    b, t, d = x.shape
    if d % self.num_heads:  # the one guard of every user: ViT, VQ-KD, decoder blocks
      raise ValueError(
        f"Attention: width {d} (inputs {list(x.shape)}) is not divisible "
        f"by num_heads {self.num_heads}"
      )
    head_dim = d // self.num_heads
    # Kernel [D, 3, D]: q, k, v apart, each head's columns contiguous, so `tensor` can
    # split heads (unilm's fused [3D, D] weight reshaped).
    qkv = nn.DenseGeneral(
      (3, d), use_bias=False, dtype=self.dtype, kernel_init=self.kernel_init, name="qkv"
    )(x)  # [B, T, 3, D]
    q_bias = self.param("q_bias", nn.initializers.zeros, (d,))
    v_bias = self.param("v_bias", nn.initializers.zeros, (d,))
    qkv_bias = jnp.stack([q_bias, jnp.zeros_like(q_bias), v_bias])  # [3, D]
    qkv = qkv + qkv_bias.astype(qkv.dtype)
    qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim)
    q, k, v = (
      nn.with_logical_constraint(qkv[:, :, i], _HEADS_ACT) for i in range(3)
    )  # [B, T, H, hd]
    biases = []
    if self.rel_pos_grid is not None:
      table = self.param(
        "relative_position_bias_table",
        nn.initializers.zeros,
        (_num_relative_distance(self.rel_pos_grid), self.num_heads),
      )
      biases.append(_gather_rel_pos_bias(table, self.rel_pos_grid))
    if rel_pos_bias is not None:
      biases.append(rel_pos_bias)
    out, attn = dot_product_attention(q, k, v, biases, return_probs=return_probs)
    out = nn.with_logical_constraint(out, _HEADS_ACT)
    out = nn.Dense(d, dtype=self.dtype, kernel_init=self.proj_kernel_init, name="proj")(
      out.reshape(b, t, d)
    )
    return out, attn


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""

  mlp_dim: int
  kernel_init: Initializer = nn.initializers.lecun_normal()
  fc2_kernel_init: Initializer = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=self.kernel_init, name="fc1")(x)
    x = nn.gelu(nn.with_logical_constraint(x, ("batch", "length", "mlp")), approximate=False)
    return nn.Dense(d, dtype=self.dtype, kernel_init=self.fc2_kernel_init, name="fc2")(x)


class Block(nn.Module):
  """Pre-norm block x + DropPath(gamma * f(LN(x))) for attention and MLP.

  Standalone so v2's shallow decoder can stack more of them with layer_id and
  drop_path_rate continuing the backbone's numbering.

  Attributes:
    layer_id: 1-based depth; attn/proj and mlp/fc2 kernels start at
      init_std / sqrt(2 * layer_id).
    rel_pos_grid: patch grid of a per-block relative position bias table;
      None for no own table.
    layer_scale_init: initial LayerScale gamma; 0 disables it.
  """

  width: int
  num_heads: int
  mlp_dim: int
  layer_id: int
  drop_path_rate: float = 0.0
  layer_scale_init: float = 0.1
  rel_pos_grid: tuple[int, int] | None = None
  init_std: float = 0.02
  truncate_init: bool = True
  dtype: Any = jnp.float32

  def _drop_path(self, x: jax.Array, train: bool, rate: jax.Array | None) -> jax.Array:
    # Same mask for all tokens and channels of a sample; kept samples / keep.
    if rate is None:
      return nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2))(x, deterministic=not train)
    if not train or self.drop_path_rate == 0:  # scanned: this layer's rate is traced
      return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1))
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))

  def __call__(
    self,
    x: jax.Array,
    rel_pos_bias: jax.Array | None = None,
    train: bool = False,
    return_attention: bool = False,
  ) -> tuple[jax.Array, jax.Array | None]:
    """Returns the block output [B, T, D] and its attention [B, H, T, T] (float32; None
    where the fused kernel ran, never with `return_attention`)."""
    return self.forward(x, rel_pos_bias, train, return_attention=return_attention)

  @nn.compact
  def forward(
    self,
    x: jax.Array,
    rel_pos_bias: jax.Array | None,
    train: bool,
    scanned: tuple[jax.Array, jax.Array] | None = None,
    return_attention: bool = False,
  ) -> tuple[jax.Array, jax.Array | None]:
    """The block; under scan, `scanned` is this layer's (0-based index, drop-path rate),
    traced, in place of `layer_id` and `drop_path_rate`."""
    init = _weight_init(self.init_std, self.truncate_init)
    if scanned is None:
      rate = None
      out_init = _weight_init(self.init_std / math.sqrt(2.0 * self.layer_id), self.truncate_init)
    else:
      index, rate = scanned

      def out_init(key, shape, dtype=jnp.float32):  # init_std / sqrt(2 * layer_id)
        return init(key, shape, dtype) * jax.lax.rsqrt(2.0 * (index + 1.0)).astype(dtype)

    y = nn.LayerNorm(_LN_EPS, dtype=jnp.float32, name="norm1")(x)
    y, attn = Attention(self.num_heads, self.rel_pos_grid, init, out_init, self.dtype, name="attn")(
      y, rel_pos_bias, return_attention
    )
    if self.layer_scale_init > 0:
      y = y * self.param("gamma_1", nn.initializers.constant(self.layer_scale_init), (self.width,))
    x = x + self._drop_path(y.astype(x.dtype), train, rate)
    y = nn.LayerNorm(_LN_EPS, dtype=jnp.float32, name="norm2")(x)
    y = Mlp(self.mlp_dim, init, out_init, self.dtype, name="mlp")(y)
    if self.layer_scale_init > 0:
      y = y * self.param("gamma_2", nn.initializers.constant(self.layer_scale_init), (self.width,))
    x = x + self._drop_path(y.astype(x.dtype), train, rate)
    return nn.with_logical_constraint(x, EMBED_ACT), attn


class VisionTransformer(nn.Module):
  """BEiT ViT: patch embedding, [CLS], optional mask token, blocks, heads.

  Defined with setup() so a wrapping module can call `norm`, `lm_head`,
  `rel_pos_bias` and `blocks` of an instance directly.

  BEiT v2's patch aggregation (docs/reference.md §4; unilm beit2
  VisionTransformerForMaskedImageModelingCLS) when `patch_aggregation_layer`
  > 0: the [CLS] of the last block (before the final norm) followed by the patch
  outputs of the first `patch_aggregation_layer` blocks (unilm's
  `early_layers`: 9 means the output of 0-based block 8; no position embedding
  re-added) go through `patch_aggregation_depth` more blocks (`cls_pt_layers_<j>`,
  layer ids and drop-path rates continuing from the aggregated block as unilm's,
  the same shared relative position bias), then the same `norm` and `lm_head`:
  output 'mim_logits_c'. With 0 (the default) the model, its params and its
  outputs are those of v1.

  `scan_layers` runs the blocks as one `nn.scan` (compile time and program size
  independent of depth): the params of block i are `blocks/...[i]`, the unscanned
  `blocks_<i>/...` stacked (`beit_jax/params/blocks.py` converts either way; the same
  init distribution, other random draws).
  """

  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  image_size: int = 224
  vocab_size: int = 0
  num_classes: int = 0
  head_init_scale: float = 1.0
  use_abs_pos_emb: bool = False
  use_shared_rel_pos_bias: bool = True
  use_rel_pos_bias: bool = False
  layer_scale_init: float = 0.1
  drop_path_rate: float = 0.0
  init_std: float = 0.02
  truncate_init: bool = True
  remat: bool = False
  remat_policy: str = REMAT_POLICIES[0]  # what a rematerialised block keeps
  scan_layers: bool = False  # blocks under nn.scan: params stacked [depth, ...] in `blocks`
  dtype: Any = jnp.float32
  patch_aggregation_layer: int = 0  # 0: off; else unilm's early_layers (1..depth)
  patch_aggregation_depth: int = 2  # unilm's head_layers

  @property
  def grid(self) -> tuple[int, int]:
    side = math.isqrt(num_patches(self.image_size, self.patch_size))
    return side, side

  @property
  def _remat_policy(self) -> Callable:
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
        f"VisionTransformer: remat_policy {self.remat_policy!r} is not one of {REMAT_POLICIES}"
      )
    return getattr(jax.checkpoint_policies, self.remat_policy)

  def setup(self):
    if self.depth < 1:
      raise ValueError(f"VisionTransformer: depth {self.depth} is not >= 1")
    grid = self.grid
    n = grid[0] * grid[1]
    init = _weight_init(self.init_std, self.truncate_init)
    self.patch_embed = nn.Conv(
      self.width,
      (self.patch_size,) * 2,
      strides=(self.patch_size,) * 2,
      padding="VALID",
      dtype=self.dtype,
      kernel_init=init,
    )
    self.cls_token = self.param("cls_token", init, (1, 1, self.width))
    self.mask_token = self.param("mask_token", init, (1, 1, self.width))
    if self.use_abs_pos_emb:
      self.pos_embed = self.param("pos_embed", init, (1, n + 1, self.width))
    if self.use_shared_rel_pos_bias:
      self.rel_pos_bias = RelativePositionBias(grid, self.num_heads)
    block_cls = (
      nn.remat(Block, static_argnums=(3, 4), policy=self._remat_policy) if self.remat else Block
    )
    block_kwargs = dict(
      layer_scale_init=self.layer_scale_init,
      rel_pos_grid=grid if self.use_rel_pos_bias else None,
      init_std=self.init_std,
      truncate_init=self.truncate_init,
      dtype=self.dtype,
    )
    # The attribute's name is the params' (SCANNED_BLOCKS; `blocks_<i>` unscanned).
    if self.scan_layers:  # one Block whose params `_scan_blocks` stacks over depth
      self.blocks = Block(
        self.width,
        self.num_heads,
        self.mlp_dim,
        layer_id=1,
        drop_path_rate=self.drop_path_rate,
        **block_kwargs,
      )
    else:
      rates = np.linspace(0.0, self.drop_path_rate, self.depth)
      self.blocks = [
        block_cls(
          self.width,
          self.num_heads,
          self.mlp_dim,
          layer_id=i + 1,
          drop_path_rate=float(rates[i]),
          **block_kwargs,
        )
        for i in range(self.depth)
      ]
    if self.patch_aggregation_layer:
      self.cls_pt_layers = self._patch_aggregation_blocks(block_cls)
    # unilm's mean-pooling fine-tuning model: no final norm, fc_norm instead.
    if self.num_classes > 0:
      self.norm = lambda x: x
      self.fc_norm = nn.LayerNorm(_LN_EPS, dtype=jnp.float32)
      self.head = nn.Dense(
        self.num_classes,
        dtype=self.dtype,
        kernel_init=_weight_init(self.init_std * self.head_init_scale, self.truncate_init),
      )
    else:
      self.norm = nn.LayerNorm(_LN_EPS, dtype=jnp.float32)
    if self.vocab_size > 0:
      self.lm_head = nn.Dense(self.vocab_size, dtype=self.dtype, kernel_init=init)

  def _patch_aggregation_blocks(self, block_cls) -> list[Block]:
    """The shallow decoder: blocks l+1 .. l+depth' of unilm's numbering (1-based)."""
    l, n = self.patch_aggregation_layer, self.patch_aggregation_depth
    if not 1 <= l <= self.depth:
      raise ValueError(
        f"VisionTransformer: patch_aggregation_layer {l} is not in "
        f"1..{self.depth} (depth: the blocks whose output is aggregated)"
      )
    if n < 1:
      raise ValueError(f"VisionTransformer: patch_aggregation_depth {n} is not >= 1")
    if self.vocab_size <= 0 or self.num_classes > 0:
      raise ValueError(
        f"VisionTransformer: patch aggregation needs the MIM head and no "
        f"classifier (vocab_size > 0, num_classes 0), not vocab_size "
        f"{self.vocab_size}, num_classes {self.num_classes}"
      )
    # unilm: linspace(0, rate, max(depth, l + n))[l + j], layer id l + j + 1.
    rates = np.linspace(0.0, self.drop_path_rate, max(self.depth, l + n))
    return [
      block_cls(
        self.width,
        self.num_heads,
        self.mlp_dim,
        layer_id=l + j + 1,
        drop_path_rate=float(rates[l + j]),
        layer_scale_init=self.layer_scale_init,
        rel_pos_grid=self.grid if self.use_rel_pos_bias else None,
        init_std=self.init_std,
        truncate_init=self.truncate_init,
        dtype=self.dtype,
      )
      for j in range(n)
    ]

  def _scan_blocks(
    self,
    x: jax.Array,
    rel_pos_bias: jax.Array | None,
    train: bool,
    return_hidden: Sequence[int],
    return_attention: bool,
  ):
    """The blocks as one nn.scan over depth: (x, early, hidden, attention) of the loop.

    The carry holds the output of block `patch_aggregation_layer` (`early`); per layer
    the scan outputs only what was asked, so stacked [depth, ...] hidden states or
    attention maps exist only then.
    """
    keep, keep_hidden = self.patch_aggregation_layer, bool(return_hidden)

    def step(block, carry, xs, rel_pos_bias):
      x, early = carry
      x, attn = block.forward(
        x,
        rel_pos_bias,
        train,
        xs,  # xs: (0-based index, rate)
        return_attention=return_attention,
      )
      if keep:
        early = jnp.where(xs[0] + 1 == keep, x, early)
      return (x, early), (x if keep_hidden else None, attn if return_attention else None)

    if self.remat:
      step = nn.remat(step, prevent_cse=False, policy=self._remat_policy)
    scan = nn.scan(
      step,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(0, nn.broadcast),
      length=self.depth,
    )
    rates = jnp.linspace(0.0, self.drop_path_rate, self.depth, dtype=jnp.float32)
    early = jnp.zeros_like(x) if keep else None
    (x, early), (hidden, attention) = scan(
      self.blocks, (x, early), (jnp.arange(self.depth), rates), rel_pos_bias
    )
    hidden = {i: hidden[i] for i in return_hidden}
    return x, early, hidden, list(attention) if return_attention else []

  def _mim_logits(self, x: jax.Array, mim_positions: jax.Array | None) -> jax.Array:
    """Normed tokens [B, N+1, D] -> MIM logits at `mim_positions` (all patches if None)."""
    patches = x[:, 1:]  # [B, N, D]
    if mim_positions is not None:
      patches = jnp.take_along_axis(patches, mim_positions[..., None], axis=1)
    return self.lm_head(patches).astype(jnp.float32)

  def patch_aggregation_logits(
    self,
    cls_token: jax.Array,
    patches: jax.Array,
    rel_pos_bias: jax.Array | None = None,
    *,
    train: bool = False,
    mim_positions: jax.Array | None = None,
  ) -> jax.Array:
    """v2's second MIM prediction from a [CLS] and a layer's patch outputs.

    Args:
      cls_token: [B, 1, D] the last block's [CLS] (before the final norm).
      patches: [B, N, D] the patch outputs of block `patch_aggregation_layer`.
      rel_pos_bias: the shared bias [H, N+1, N+1]; computed here if None.
      train, mim_positions: as for `__call__`.

    Returns:
      [B, K or N, vocab] logits through the shallow decoder, `norm` and `lm_head`.
    """
    if rel_pos_bias is None and self.use_shared_rel_pos_bias:
      rel_pos_bias = self.rel_pos_bias()
    x = jnp.concatenate([cls_token, patches], axis=1)  # [B, N+1, D]
    for block in self.cls_pt_layers:
      x, _ = block(x, rel_pos_bias, train, False)  # remat's static args: all passed
    return self._mim_logits(self.norm(x), mim_positions)

  def __call__(
    self,
    images: jax.Array,
    bool_masked_pos: jax.Array | None = None,
    *,
    train: bool = False,
    mim_positions: jax.Array | None = None,
    return_hidden: Sequence[int] = (),
    return_attention: bool = False,
  ) -> dict[str, Any]:
    """Runs the model.

    Args:
      images: [B, H, W, 3] float, H = W = image_size.
      bool_masked_pos: [B, N] bool; True patches get `mask_token` in place of
        their patch embedding (before position information).
      train: enables drop path (needs the 'dropout' rng).
      mim_positions: [B, K] int patch indices at which to compute MIM logits;
        None computes them at all N patches.
      return_hidden: 0-based block indices whose outputs (with [CLS], before
        the final norm) to return.
      return_attention: also return every block's softmax attention.

    Returns:
      dict with 'tokens' [B, N+1, D] (after the final norm), 'mim_logits'
      [B, K or N, vocab] if vocab_size, 'logits' [B, classes] if num_classes,
      'hidden' {i: [B, N+1, D]} if asked, 'attention' [[B, H, N+1, N+1]] if
      asked; with patch aggregation also 'mim_logits_c' (same shape as
      'mim_logits').
    """
    s = self.image_size
    if images.ndim != 4 or images.shape[1:3] != (s, s):
      raise ValueError(
        f"VisionTransformer: images {list(images.shape)}: expected "
        f"[B, {s}, {s}, C] (image_size {s})"
      )
    bad = [i for i in return_hidden if not 0 <= i < self.depth]
    if bad:
      raise ValueError(
        f"VisionTransformer: return_hidden {tuple(return_hidden)}: blocks "
        f"{bad} are not in 0..{self.depth - 1} (depth {self.depth})"
      )
    b = images.shape[0]
    x = self.patch_embed(images)  # [B, h, w, D]
    x = x.reshape(b, -1, self.width).astype(jnp.float32)  # [B, N, D]
    if bool_masked_pos is not None:
      x = jnp.where(bool_masked_pos[..., None], self.mask_token, x)
    cls = jnp.broadcast_to(self.cls_token, (b, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)  # [B, N+1, D]
    if self.use_abs_pos_emb:
      x = x + self.pos_embed
    x = nn.with_logical_constraint(x, EMBED_ACT)
    rel_pos_bias = self.rel_pos_bias() if self.use_shared_rel_pos_bias else None

    if self.scan_layers:
      x, early, hidden, attention = self._scan_blocks(
        x, rel_pos_bias, train, return_hidden, return_attention
      )
    else:
      hidden, attention, early = {}, [], None
      for i, block in enumerate(self.blocks):
        x, attn = block(x, rel_pos_bias, train, return_attention)
        if i in return_hidden:
          hidden[i] = x
        if i + 1 == self.patch_aggregation_layer:
          early = x  # unilm: `if i + 1 == early_layers: early_states = x[:, 1:]`
        attention.append(attn)

    last = x
    x = self.norm(x)
    out = {"tokens": x}
    if self.vocab_size > 0:
      out["mim_logits"] = self._mim_logits(x, mim_positions)
    if self.patch_aggregation_layer:
      out["mim_logits_c"] = self.patch_aggregation_logits(
        last[:, :1], early[:, 1:], rel_pos_bias, train=train, mim_positions=mim_positions
      )
    if self.num_classes > 0:
      pooled = self.fc_norm(jnp.mean(x[:, 1:], axis=1))  # [B, D]
      out["logits"] = self.head(pooled).astype(jnp.float32)
    if return_hidden:
      out["hidden"] = hidden
    if return_attention:
      out["attention"] = attention
    return out
