"""VQ-KD, the BEiT v2 visual tokenizer (arXiv 2208.06366), as linen modules.

A ViT encoder maps the image to one `code_dim`-d vector per patch; each vector is
l2-normalised and snapped to the nearest (by cosine) entry of a codebook of
`num_codes` unit vectors; a shallow ViT decoder maps the grid of codes to features that
are trained to match a frozen teacher's (CLIP or DINO) patch features by cosine. BEiT v2
then predicts the code indices of masked patches, as v1 predicts dVAE tokens.

Layout follows microsoft/unilm `beit2/modeling_vqkd.py` and `norm_ema_quantizer.py`, so
a converter is a rename as for the ViT (torch `a.b.0.weight` -> flax `a/b_0/kernel`,
transposed; `patch_embed.proj` -> `patch_embed`):

  params/encoder/{patch_embed, cls_token, pos_embed, blocks_<i>, fc_norm}
  params/encode_task_layer_0, encode_task_layer_2      Linear(D, D), tanh, Linear(D, C)
  params/decoder/{patch_embed, cls_token, pos_embed, blocks_<i>, fc_norm}
  params/decode_task_layer_0, decode_task_layer_2      Linear(D', D'), tanh, Linear(D', T)
  codebook/embedding [K, C]   (unilm quantize.embedding.weight)
  codebook/cluster_size [K]   (unilm quantize.cluster_size: EMA of per-step counts)
  codebook/initted []         (unilm quantize.embedding.initted)

The codebook is not trained by gradient: it lives in its own variable collection and
changes only through the pure functions below (`init_codebook` once, on the first batch,
then `ema_update` after every step), which a trainer applies to
`variables['codebook']` next to its optimizer update.

Data parallelism: these functions take the global batch. Under `jit` with the batch
sharded over devices and processes (the trainer's step), XLA sums the per-code counts
and sums across all of them, so every device keeps the codebook of the whole batch.
unilm instead initialises the codebook on each GPU's own batch; synchronising it is
deliberate.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beit_jax.models import paths as param_paths
from beit_jax.models import vit
from beit_jax.models.vit import Block, num_patches

Codebook = dict[str, jax.Array]  # {'embedding': [K, C], 'cluster_size': [K], 'initted': []}
# Sharding (`param_paths`): the encoder and decoder (`FeatureViT`) name their weights as the
# ViT does; the task layers and the codebook have no roles (sharded by size).
PARAM_AXES = param_paths.nested("encoder|decoder", vit.PARAM_AXES)

_LN_EPS = 1e-6
_NORM_EPS = 1e-12  # torch F.normalize's default
_HIGHEST = jax.lax.Precision.HIGHEST  # f32 dots on TPU too: argmax near-ties matter


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / max(||x||, 1e-12) along `axis`, as torch F.normalize."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, _NORM_EPS)


# ---------------------------------------------------------------------------------------
# Quantizer (unilm NormEMAVectorQuantizer), pure functions.


def nearest_code(z: jax.Array, embedding: jax.Array) -> jax.Array:
  """Index of the most cosine-similar code: [..., C], [K, C] -> int32 [...].

  For unit z and codes this is the Euclidean nearest code (unilm's argmin distance);
  the first index wins a tie.
  """
  sim = jnp.einsum("...c,kc->...k", z, l2_normalize(embedding), precision=_HIGHEST)  # [..., K]
  return jnp.argmax(sim, axis=-1).astype(jnp.int32)


def quantize(
  z: jax.Array, embedding: jax.Array, beta: float = 1.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Snaps l2-normalised z to the nearest code, with a straight-through gradient.

  Args:
    z: [..., C] l2-normalised encoder outputs.
    embedding: [K, C] codebook (normalised here again; EMA keeps it unit anyway).
    beta: weight of the commitment loss.

  Returns:
    z_q [..., C]: the codes forward, identity to z backward (z + sg(code - z));
    codes int32 [...]; commitment loss beta * mean((sg(code) - z)^2) over elements,
    the only term through which z is pulled to its code (the codebook gets no gradient).
  """
  embedding = jax.lax.stop_gradient(l2_normalize(embedding))
  codes = nearest_code(jax.lax.stop_gradient(z), embedding)
  code_vectors = embedding[codes]  # [..., C]
  commitment = beta * jnp.mean(jnp.square(code_vectors - z))
  z_q = z + jax.lax.stop_gradient(code_vectors - z)
  return z_q, codes, commitment


def _code_sums(z: jax.Array, codes: jax.Array, num_codes: int) -> tuple[jax.Array, jax.Array]:
  """Per-code sum of the assigned vectors [K, C] and counts [K]."""
  z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)  # [n, C]
  codes = codes.reshape(-1)  # [n]
  # segment_sum adds in f32 on every backend (a one-hot matmul would run at bf16
  # precision on TPU by default).
  sums = jax.ops.segment_sum(z, codes, num_segments=num_codes)  # [K, C]
  counts = jax.ops.segment_sum(
    jnp.ones(codes.shape, jnp.float32), codes, num_segments=num_codes
  )  # [K]
  return sums, counts


def _sample_rows(x: jax.Array, num: int, rng: jax.Array) -> jax.Array:
  """`num` random rows of x [..., C]."""
  x = x.reshape(-1, x.shape[-1])
  n = x.shape[0]
  # Distinct rows when there are enough (unilm: randperm[:num], else randint).
  index = jax.random.choice(rng, n, (num,), replace=n < num)  # [num]
  return x[index]


def ema_update(
  codebook_state: Codebook, z_normalised: jax.Array, codes: jax.Array, decay: float = 0.99
) -> Codebook:
  """One EMA step of the codebook on a batch's assignments (unilm's training update).

  For every code with count n_k > 0 this step: mean_k = l2norm(sum of its z / n_k) and
  code_k <- l2norm(decay * code_k + (1 - decay) * mean_k); codes with n_k = 0 are left
  exactly as they are. cluster_size <- decay * cluster_size + (1 - decay) * n.

  Args:
    codebook_state: {'embedding': [K, C], 'cluster_size': [K], 'initted': []}.
    z_normalised: [..., C] the l2-normalised encoder outputs (`VQKD` output 'z').
    codes: int [...] their assigned codes (output 'codes').
    decay: EMA decay.

  Returns:
    the new codebook state (same structure; 'initted' unchanged).
  """
  embedding = codebook_state["embedding"]
  z_normalised = jax.lax.stop_gradient(z_normalised)
  sums, counts = _code_sums(z_normalised, codes, embedding.shape[0])
  used = counts > 0  # [K]
  mean = l2_normalize(sums / jnp.maximum(counts, 1.0)[:, None])  # [K, C]
  moved = l2_normalize(decay * embedding + (1.0 - decay) * mean)
  return dict(
    codebook_state,
    embedding=jnp.where(used[:, None], moved, embedding),
    cluster_size=decay * codebook_state["cluster_size"] + (1.0 - decay) * counts,
  )


def kmeans_init(
  z_normalised: jax.Array, num_codes: int, rng: jax.Array, iters: int = 10
) -> tuple[jax.Array, jax.Array]:
  """Cosine k-means (Lloyd) on l2-normalised vectors: unilm's codebook initialisation.

  Starts from `num_codes` distinct random rows (drawn with `rng`; with replacement if
  there are fewer rows than codes), then `iters` times assigns every vector to its most
  similar mean and moves each mean to the l2-normalised average of its vectors (a mean
  with no vectors stays).

  Args:
    z_normalised: [..., C] unit vectors (a batch's encoder outputs).
    num_codes: K.
    rng: PRNG key; the result is a deterministic function of it and the data.
    iters: Lloyd iterations (unilm: 10); 0 returns the starting rows.

  Returns:
    means [K, C] (unit rows) and counts [K] (float32) of the last assignment.
  """
  z = jax.lax.stop_gradient(z_normalised).reshape(-1, z_normalised.shape[-1])
  z = z.astype(jnp.float32)
  means = _sample_rows(z, num_codes, rng)  # [K, C]

  def step(_, carry):
    means, _ = carry
    sums, counts = _code_sums(z, nearest_code(z, means), num_codes)
    new = l2_normalize(sums / jnp.maximum(counts, 1.0)[:, None])
    return jnp.where((counts > 0)[:, None], new, means), counts

  return jax.lax.fori_loop(0, iters, step, (means, jnp.zeros((num_codes,), jnp.float32)))


def init_codebook(
  codebook_state: Codebook, z_normalised: jax.Array, rng: jax.Array, iters: int = 10
) -> Codebook:
  """k-means initialisation of a codebook that is not 'initted' yet; else a no-op.

  Meant for the first training batch (jit-safe, so a trainer may call it every step:
  after the first it only costs a branch). cluster_size starts at the k-means counts,
  the scale of one step's counts, so codes are not all reported dead at step 0 (unilm
  starts its usage statistics at zero).
  """

  def initialise(state):
    means, counts = kmeans_init(z_normalised, state["embedding"].shape[0], rng, iters)
    return dict(
      state,
      embedding=means.astype(state["embedding"].dtype),
      cluster_size=counts,
      initted=jnp.ones_like(state["initted"]),
    )

  return jax.lax.cond(codebook_state["initted"], lambda s: s, initialise, codebook_state)


def codebook_usage(
  codebook_state: Codebook, codes: jax.Array, dead_threshold: float = 1.0
) -> dict[str, jax.Array]:
  """How much of the codebook is in use: the statistics to watch for collapse.

  Args:
    codebook_state: the codebook (its EMA 'cluster_size').
    codes: int [...] a batch's assigned codes.
    dead_threshold: a code is dead when its EMA count per step is below this.

  Returns:
    'perplexity': exp(entropy) of the batch's code histogram (1 when one code takes
      everything, K when all are used equally); 'used_codes': codes assigned in the
      batch; 'dead_codes', 'dead_fraction': number and fraction of codes with
      cluster_size < dead_threshold.
  """
  cluster_size = codebook_state["cluster_size"]
  num_codes = cluster_size.shape[0]
  counts = jax.ops.segment_sum(
    jnp.ones(codes.size, jnp.float32), codes.reshape(-1), num_segments=num_codes
  )  # [K]
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  dead = jnp.sum(cluster_size < dead_threshold)
  return {
    "perplexity": jnp.exp(entropy),
    "used_codes": jnp.sum(counts > 0),
    "dead_codes": dead,
    "dead_fraction": dead / num_codes,
  }


def restart_dead_codes(
  codebook_state: Codebook, recent_z: jax.Array, rng: jax.Array, threshold: float = 1.0
) -> Codebook:
  """Replaces dead codes (cluster_size < threshold) by random recent encoder outputs.

  A remedy for codebook collapse that unilm does not use (recipes keep it off). Each
  revived code is a distinct l2-normalised row of `recent_z` (so it is at least the
  nearest code of that vector) and gets cluster_size = threshold, i.e. it counts as
  alive until the EMA decays it again without assignments.

  Args:
    codebook_state: the codebook.
    recent_z: [..., C] recent encoder outputs (e.g. this batch's 'z').
    rng: PRNG key.
    threshold: the dead threshold of `codebook_usage`.
  """
  embedding = codebook_state["embedding"]
  cluster_size = codebook_state["cluster_size"]
  fresh = l2_normalize(
    _sample_rows(jax.lax.stop_gradient(recent_z), embedding.shape[0], rng)
  )  # [K, C]
  dead = cluster_size < threshold  # [K]
  return dict(
    codebook_state,
    embedding=jnp.where(dead[:, None], fresh.astype(embedding.dtype), embedding),
    cluster_size=jnp.where(dead, jnp.asarray(threshold, cluster_size.dtype), cluster_size),
  )


def cosine_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """1 - cos(prediction_i, target_i), averaged over all patches: [..., T] -> []."""
  cos = jnp.sum(
    l2_normalize(prediction.astype(jnp.float32)) * l2_normalize(target.astype(jnp.float32)), axis=-1
  )
  return jnp.mean(1.0 - cos)


# ---------------------------------------------------------------------------------------
# Modules.


class FeatureViT(nn.Module):
  """unilm's fine-tuning ViT with mean pooling, returning LayerNormed patch tokens.

  What VQ-KD's encoder and decoder are: absolute position embedding over [CLS] +
  patches, no LayerScale, no relative position bias, identity final norm and `fc_norm`
  on the patch tokens ([CLS] is dropped). Not `vit.VisionTransformer`, which normalises
  with `norm` (or only the pooled mean with `fc_norm`) and always holds a mask token.
  Initialisation: normal(0.02) (timm's trunc_normal_ at ±2 absolute), proj/fc2
  scaled by 1/sqrt(2 * layer_id).

  Attributes:
    patch_size: 16 for the encoder; 1 for the decoder, whose "image" is the grid of
      code vectors (the patch embedding is then a Linear(C, D) per position).
    image_size: input side (the decoder's is the token grid side).
  """

  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  image_size: int = 224
  drop_path_rate: float = 0.0
  init_std: float = 0.02
  remat: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    if self.depth < 1:  # width % num_heads: `Attention`'s guard
      raise ValueError(f"FeatureViT: depth {self.depth} is not >= 1")
    n = num_patches(self.image_size, self.patch_size)
    init = nn.initializers.normal(self.init_std)
    self.patch_embed = nn.Conv(
      self.width,
      (self.patch_size,) * 2,
      strides=(self.patch_size,) * 2,
      padding="VALID",
      dtype=self.dtype,
      kernel_init=init,
    )
    self.cls_token = self.param("cls_token", init, (1, 1, self.width))
    self.pos_embed = self.param("pos_embed", init, (1, n + 1, self.width))
    block_cls = nn.remat(Block, static_argnums=(3,)) if self.remat else Block
    rates = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
    self.blocks = [
      block_cls(
        self.width,
        self.num_heads,
        self.mlp_dim,
        layer_id=i + 1,
        drop_path_rate=rates[i],
        layer_scale_init=0.0,
        init_std=self.init_std,
        truncate_init=False,
        dtype=self.dtype,
      )
      for i in range(self.depth)
    ]
    self.fc_norm = nn.LayerNorm(_LN_EPS, dtype=jnp.float32)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, S, S, in_channels] (S = image_size) -> patch tokens [B, N, D] (float32)."""
    s = self.image_size
    if x.ndim != 4 or x.shape[1:3] != (s, s):
      raise ValueError(
        f"FeatureViT: inputs {list(x.shape)}: expected [B, {s}, {s}, C] (image_size {s})"
      )
    b = x.shape[0]
    x = self.patch_embed(x)  # [B, h, w, D]
    x = x.reshape(b, -1, self.width).astype(jnp.float32)  # [B, N, D]
    cls = jnp.broadcast_to(self.cls_token, (b, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed  # [B, N+1, D]
    for block in self.blocks:
      x, _ = block(x, None, train)
    return self.fc_norm(x[:, 1:])  # [B, N, D]


class VQKD(nn.Module):
  """The BEiT v2 tokenizer: ViT encoder, cosine codebook, shallow ViT decoder.

  Defaults are unilm's `vqkd_encoder_base_decoder_3x768x12_clip` (ViT-B/16 encoder,
  8192 x 32 codebook, 3-block decoder, 512-d CLIP-B/16 targets).

  Images are the tokenizer's view: [B, S, S, 3] in [-1, 1] (the "signed" value
  mapping of `beit_jax.data.views`; unilm rescales its input the same way). The
  teacher sees the same crop in its own view (`Teacher.normalization`) and its
  [CLS]-free patch features are the targets. Views are made by the input pipeline.

  Attributes:
    num_codes, code_dim: codebook K x C.
    teacher_dim: T, width of the teacher's patch features (512 CLIP, 768 DINO).
    beta: commitment loss weight.
    kmeans_init: the codebook starts random and not 'initted', for `init_codebook` on
      the first batch; False: random unit codes marked 'initted'.
    decoder_*: the decoder ViT's sizes (its patch size is 1, its grid the token grid).
  """

  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  decoder_width: int = 768
  decoder_depth: int = 3
  decoder_num_heads: int = 12
  decoder_mlp_dim: int = 3072
  num_codes: int = 8192
  code_dim: int = 32
  teacher_dim: int = 512
  beta: float = 1.0
  kmeans_init: bool = True
  drop_path_rate: float = 0.0
  remat: bool = False
  dtype: Any = jnp.float32

  @property
  def grid(self) -> tuple[int, int]:
    side = math.isqrt(num_patches(self.image_size, self.patch_size))
    return side, side

  def setup(self):
    if self.num_codes < 1 or self.code_dim < 1:
      raise ValueError(
        f"VQKD: num_codes {self.num_codes} and code_dim {self.code_dim} must be >= 1"
      )
    init = nn.initializers.normal(0.02)
    self.encoder = FeatureViT(
      self.patch_size,
      self.width,
      self.depth,
      self.num_heads,
      self.mlp_dim,
      self.image_size,
      self.drop_path_rate,
      remat=self.remat,
      dtype=self.dtype,
    )
    self.encode_task_layer_0 = nn.Dense(self.width, kernel_init=init)
    self.encode_task_layer_2 = nn.Dense(self.code_dim, kernel_init=init)
    self.decoder = FeatureViT(
      1,
      self.decoder_width,
      self.decoder_depth,
      self.decoder_num_heads,
      self.decoder_mlp_dim,
      self.grid[0],
      self.drop_path_rate,
      remat=self.remat,
      dtype=self.dtype,
    )
    self.decode_task_layer_0 = nn.Dense(self.decoder_width, kernel_init=init)
    self.decode_task_layer_2 = nn.Dense(self.teacher_dim, kernel_init=init)

    shape = (self.num_codes, self.code_dim)
    self.embedding = self.variable(
      "codebook",
      "embedding",
      lambda: l2_normalize(jax.random.normal(self.make_rng("params"), shape)),
    )
    self.cluster_size = self.variable(
      "codebook", "cluster_size", jnp.zeros, (self.num_codes,), jnp.float32
    )
    self.initted = self.variable("codebook", "initted", lambda: jnp.asarray(not self.kmeans_init))

  def encode(self, images: jax.Array, train: bool = False) -> jax.Array:
    """[B, S, S, 3] in [-1, 1] -> z [B, h, w, C], l2-normalised (before quantization)."""
    x = self.encoder(images.astype(self.dtype), train)  # [B, N, D]
    # unilm runs the task layer in float32 whatever the autocast.
    x = nn.tanh(self.encode_task_layer_0(x.astype(jnp.float32)))
    z = self.encode_task_layer_2(x)  # [B, N, C]
    return l2_normalize(z.reshape(z.shape[0], *self.grid, self.code_dim))

  def quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """z [B, h, w, C] -> z_q [B, h, w, C], codes int32 [B, h, w], commitment loss."""
    return quantize(z, self.embedding.value, self.beta)

  def get_codebook_indices(self, images: jax.Array) -> jax.Array:
    """[B, S, S, 3] in [-1, 1] -> int32 codes [B, h, w] (the MIM targets)."""
    return nearest_code(self.encode(images), self.embedding.value)

  def decode(self, z_q: jax.Array, train: bool = False) -> jax.Array:
    """Code vectors [B, h, w, C] -> reconstructed teacher features [B, N, T]."""
    x = self.decoder(z_q.astype(self.dtype), train)  # [B, N, D']
    x = nn.tanh(self.decode_task_layer_0(x.astype(jnp.float32)))
    return self.decode_task_layer_2(x)  # [B, N, T] float32

  def distill(
    self, z: jax.Array, embedding: jax.Array, teacher_features: jax.Array, train: bool = False
  ) -> dict[str, jax.Array]:
    """Quantizes z with `embedding`, decodes and scores against the teacher: the loss.

    The codebook is an argument so that a trainer can k-means-initialise it on the
    batch's z (`init_codebook`) between `encode` and this, as unilm does.

    Args:
      z: [B, h, w, C] l2-normalised encoder outputs (`encode`).
      embedding: [K, C] the codebook.
      teacher_features: [B, N, T] the teacher's patch features ([CLS] dropped).
      train: enables the decoder's drop path (needs the 'dropout' rng).

    Returns:
      'loss' = 'cosine_loss' + 'commitment_loss' (scalars); 'codes' int32 [B, h, w];
      'reconstruction' [B, N, T].
    """
    z_q, codes, commitment = quantize(z, embedding, self.beta)
    reconstruction = self.decode(z_q, train)  # [B, N, T]
    if teacher_features.shape != reconstruction.shape:
      raise ValueError(
        f"VQKD: teacher_features {list(teacher_features.shape)}: expected "
        f"{list(reconstruction.shape)} (batch, patches, teacher_dim)"
      )
    rec = cosine_loss(reconstruction, jax.lax.stop_gradient(teacher_features))
    return {
      "loss": rec + commitment,
      "cosine_loss": rec,
      "commitment_loss": commitment,
      "codes": codes,
      "reconstruction": reconstruction,
    }

  def __call__(
    self, images: jax.Array, teacher_features: jax.Array, train: bool = False
  ) -> dict[str, jax.Array]:
    """Encodes, then `distill` with the model's codebook (`init` runs this).

    Args:
      images: [B, S, S, 3] in [-1, 1].
      teacher_features: [B, N, T] the teacher's patch features ([CLS] dropped).
      train: enables drop path (needs the 'dropout' rng). The codebook is never
        changed here: apply `ema_update(codebook, out['z'], out['codes'])`.

    Returns:
      `distill`'s outputs and 'z' [B, h, w, C], the l2-normalised encoder outputs.
    """
    z = self.encode(images, train)  # [B, h, w, C]
    return dict(self.distill(z, self.embedding.value, teacher_features, train), z=z)


def tokenize(variables: Any, images: jax.Array, *, model: VQKD) -> jax.Array:
  """Frozen visual tokens: the nearest code of every patch.

  Args:
    variables: {'params': ..., 'codebook': ...} of `model` (the decoder's params are
      not used).
    images: [B, S, S, 3] in [-1, 1] (the tokenizer's "signed" view).
    model: the `VQKD` the variables belong to.

  Returns:
    int32 [B, S/p, S/p] in [0, num_codes).
  """
  variables = jax.lax.stop_gradient(variables)
  return model.apply(variables, images, method=VQKD.get_codebook_indices)
