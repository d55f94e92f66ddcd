"""DALL-E discrete VAE (BEiT v1 tokenizer), a port of OpenAI's `dall_e` package.

The encoder maps an image to a grid (1/8 of its size) of logits over `vocab_size` visual
tokens; BEiT's MIM targets are their argmax (`tokenize`). The decoder maps one-hot (or
Gumbel-softmax relaxed) codes back to the parameters of a logit-Laplace distribution per
pixel. `DiscreteVAE` + `elbo_loss` + the two schedules are the stage-1 training recipe of
the DALL-E paper.

Parameter names mirror the PyTorch module paths of `dall_e` so that `encoder.pkl` /
`decoder.pkl` convert one to one: torch key `blocks.<path>.w` of shape
[n_out, n_in, kw, kw] is flax `blocks/<path>/w` of shape [kw, kw, n_in, n_out]
(transpose (2, 3, 1, 0)); `.b` maps unchanged. The paths are:
  blocks/input                                    stem conv (7x7 encoder, 1x1 decoder)
  blocks/group_{1..4}/block_{j}/id_path           1x1 conv, only when channels change
  blocks/group_{1..4}/block_{j}/res_path/conv_{1..4}
  blocks/output/conv                              1x1 output conv (after a ReLU)
Inside `DiscreteVAE` they sit under `encoder/` and `decoder/`.
"""

import math
from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

LOGIT_LAPLACE_EPS = 0.1
NUM_GROUPS = 4  # dall_e always builds 4 groups; `group_count` only sets the post-gain.
# Sharding (`param_paths`): convolutions only, no weight has a role; `sharding.py` splits
# each one's largest divisible dimension over fsdp.
PARAM_AXES = ()


def map_pixels(x: jax.Array, eps: float = LOGIT_LAPLACE_EPS) -> jax.Array:
  """[0, 1] -> [eps, 1 - eps]: keeps pixels away from the logit-Laplace's singular ends."""
  return (1 - 2 * eps) * x + eps


def unmap_pixels(x: jax.Array, eps: float = LOGIT_LAPLACE_EPS) -> jax.Array:
  """Inverse of `map_pixels`, clipped to [0, 1]."""
  return jnp.clip((x - eps) / (1 - 2 * eps), 0, 1)


def _check_sizes(module: nn.Module, **positive: int) -> None:
  """`module.n_hid` a positive multiple of 4, each of `positive` >= 1."""
  # Every block's hidden width is n_out // 4, and every n_out is a multiple of n_hid.
  name = f"dVAE {type(module).__name__}"
  if module.n_hid < 4 or module.n_hid % 4:
    raise ValueError(f"{name}: n_hid {module.n_hid} is not a positive multiple of 4")
  for field, value in positive.items():
    if value < 1:
      raise ValueError(f"{name}: {field} {value} is not >= 1")


class Conv2d(nn.Module):
  """`dall_e.utils.Conv2d` in NHWC: 'same' padding for an odd kernel, params `w`, `b`.

  Attributes:
    n_out: output channels (the input width is read from the input).
    kw: kernel width (odd).
    dtype: computation dtype; parameters are stored in float32.
  """

  n_out: int
  kw: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = x.shape[-1]
    std = 1 / math.sqrt(n_in * self.kw * self.kw)
    w = self.param(
      "w", nn.initializers.normal(stddev=std), (self.kw, self.kw, n_in, self.n_out), jnp.float32
    )
    b = self.param("b", nn.initializers.zeros, (self.n_out,), jnp.float32)
    pad = (self.kw - 1) // 2
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      w.astype(self.dtype),
      window_strides=(1, 1),
      padding=((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + b.astype(self.dtype)


class _ResPath(nn.Module):
  """ReLU before each conv; hidden width `n_hid`, last conv to `n_out`."""

  n_hid: int
  n_out: int
  kernel_sizes: tuple[int, ...]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    widths = (self.n_hid,) * (len(self.kernel_sizes) - 1) + (self.n_out,)
    for i, (kw, n) in enumerate(zip(self.kernel_sizes, widths)):
      x = Conv2d(n, kw, dtype=self.dtype, name=f"conv_{i + 1}")(nn.relu(x))
    return x


class _ResBlock(nn.Module):
  """id_path(x) + post_gain * res_path(x), post_gain = 1 / n_layers**2.

  The small post-gain (1/64 for DALL-E) keeps the residual stack near identity at init,
  which the DALL-E paper credits for stable training.

  Attributes:
    n_out: output channels; the res-path hidden width is n_out // 4.
    n_layers: total number of residual blocks of the network (sets the post-gain).
    dtype: computation dtype.
  """

  n_out: int
  n_layers: int
  dtype: Dtype = jnp.float32
  kernel_sizes: ClassVar[tuple[int, ...]] = ()

  @property
  def post_gain(self) -> float:
    return 1 / self.n_layers**2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.n_out:
      identity = Conv2d(self.n_out, 1, dtype=self.dtype, name="id_path")(x)
    else:
      identity = x.astype(self.dtype)
    res = _ResPath(
      self.n_out // 4, self.n_out, self.kernel_sizes, dtype=self.dtype, name="res_path"
    )(x)
    return identity + self.post_gain * res


class EncoderBlock(_ResBlock):
  """Encoder residual block: res_path convs 3x3, 3x3, 3x3, 1x1."""

  kernel_sizes = (3, 3, 3, 1)


class DecoderBlock(_ResBlock):
  """Decoder residual block: res_path convs 1x1, 3x3, 3x3, 3x3."""

  kernel_sizes = (1, 3, 3, 3)


def _max_pool_2x(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))


def _upsample_2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2, like torch `nn.Upsample(scale_factor=2, mode='nearest')`."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class _Group(nn.Module):
  """`group_i`: residual blocks `block_1..n` (the first one changes width), then resampling."""

  n_out: int
  n_blk: int
  n_layers: int
  block: type[_ResBlock]
  resample: Optional[Callable[[jax.Array], jax.Array]]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.n_blk):
      x = self.block(self.n_out, self.n_layers, dtype=self.dtype, name=f"block_{i + 1}")(x)
    return x if self.resample is None else self.resample(x)


class _Output(nn.Module):
  """`output`: ReLU then a 1x1 conv named `conv`."""

  n_out: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return Conv2d(self.n_out, 1, dtype=self.dtype, name="conv")(nn.relu(x))


class _Blocks(nn.Module):
  """`blocks` of both dall_e networks: stem conv, 4 groups, output; resample after groups 1-3.

  The encoder and decoder are the same skeleton with different widths, kernels and
  resampling. The stem/output conv touching the 8192-way code space keeps float32
  (`use_float16=False` in dall_e).
  """

  input_kw: int
  n_input: int
  group_widths: tuple[int, ...]
  n_blk_per_group: int
  n_layers: int
  block: type[_ResBlock]
  resample: Callable[[jax.Array], jax.Array]
  n_output: int
  input_dtype: Dtype
  output_dtype: Dtype
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Conv2d(self.n_input, self.input_kw, dtype=self.input_dtype, name="input")(x)
    for g, width in enumerate(self.group_widths):
      last = g == len(self.group_widths) - 1
      x = _Group(
        width,
        self.n_blk_per_group,
        self.n_layers,
        self.block,
        None if last else self.resample,
        dtype=self.dtype,
        name=f"group_{g + 1}",
      )(x)
    return _Output(self.n_output, dtype=self.output_dtype, name="output")(x)


class Encoder(nn.Module):
  """DALL-E dVAE encoder: mapped pixels [B, H, W, C] -> code logits [B, H/8, W/8, vocab].

  Attributes:
    n_hid: base width; groups are 1, 2, 4, 8 times it.
    n_blk_per_group: residual blocks per group.
    vocab_size: number of visual tokens.
    group_count: enters only the post-gain 1/(group_count*n_blk_per_group)**2, as in
      dall_e (the network always has 4 groups).
    input_channels: image channels.
    dtype: computation dtype of the convs (the output conv is float32).
  """

  n_hid: int = 256
  n_blk_per_group: int = 2
  vocab_size: int = 8192
  group_count: int = 4
  input_channels: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_sizes(
      self,
      n_blk_per_group=self.n_blk_per_group,
      vocab_size=self.vocab_size,
      group_count=self.group_count,
    )
    if x.ndim != 4 or x.shape[-1] != self.input_channels:
      raise ValueError(
        f"dVAE Encoder: images {list(x.shape)}: expected "
        f"[B, H, W, {self.input_channels}] (input_channels)"
      )
    if x.shape[1] % 8 or x.shape[2] % 8:
      raise ValueError(
        f"dVAE Encoder: images {list(x.shape)}: height and width must be multiples of 8"
      )
    logits = _Blocks(
      input_kw=7,
      n_input=self.n_hid,
      group_widths=tuple(m * self.n_hid for m in (1, 2, 4, 8)),
      n_blk_per_group=self.n_blk_per_group,
      n_layers=self.group_count * self.n_blk_per_group,
      block=EncoderBlock,
      resample=_max_pool_2x,
      n_output=self.vocab_size,
      input_dtype=self.dtype,
      output_dtype=jnp.float32,
      dtype=self.dtype,
      name="blocks",
    )(x)
    return logits.astype(jnp.float32)  # [B, H/8, W/8, vocab]


class Decoder(nn.Module):
  """DALL-E dVAE decoder: codes [B, h, w, vocab] -> [B, 8h, 8w, 2*output_channels].

  The first `output_channels` outputs are the logit-Laplace location `mu` (in logit
  space of the mapped pixels), the rest its log-scale.

  Attributes:
    n_init: width of the 1x1 stem conv out of the code space.
    n_hid: base width; groups are 8, 4, 2, 1 times it.
    n_blk_per_group: residual blocks per group.
    vocab_size: number of visual tokens.
    output_channels: image channels.
    group_count: enters only the post-gain, as in `Encoder`.
    dtype: computation dtype of the convs (the stem conv is float32).
  """

  n_init: int = 128
  n_hid: int = 256
  n_blk_per_group: int = 2
  vocab_size: int = 8192
  output_channels: int = 3
  group_count: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    _check_sizes(
      self,
      n_init=self.n_init,
      n_blk_per_group=self.n_blk_per_group,
      vocab_size=self.vocab_size,
      output_channels=self.output_channels,
      group_count=self.group_count,
    )
    if z.ndim != 4 or z.shape[-1] != self.vocab_size:
      raise ValueError(
        f"dVAE Decoder: codes {list(z.shape)}: expected [B, h, w, {self.vocab_size}] (vocab_size)"
      )
    out = _Blocks(
      input_kw=1,
      n_input=self.n_init,
      group_widths=tuple(m * self.n_hid for m in (8, 4, 2, 1)),
      n_blk_per_group=self.n_blk_per_group,
      n_layers=self.group_count * self.n_blk_per_group,
      block=DecoderBlock,
      resample=_upsample_2x,
      n_output=2 * self.output_channels,
      input_dtype=jnp.float32,
      output_dtype=self.dtype,
      dtype=self.dtype,
      name="blocks",
    )(z)
    return out.astype(jnp.float32)  # [B, 8h, 8w, 2 * output_channels]


class DiscreteVAE(nn.Module):
  """Encoder + decoder with a Gumbel-softmax relaxed bottleneck (DALL-E stage 1).

  Params: {'encoder': ..., 'decoder': ...}; `tokenize` needs only 'encoder'.

  Attributes:
    vocab_size: number of visual tokens.
    n_hid: base width of both networks.
    n_blk_per_group: residual blocks per group in both networks.
    n_init: decoder stem width.
    dtype: computation dtype of the convs.
  """

  vocab_size: int = 8192
  n_hid: int = 256
  n_blk_per_group: int = 2
  n_init: int = 128
  dtype: Dtype = jnp.float32

  def setup(self):
    self.encoder = Encoder(
      n_hid=self.n_hid,
      n_blk_per_group=self.n_blk_per_group,
      vocab_size=self.vocab_size,
      dtype=self.dtype,
    )
    self.decoder = Decoder(
      n_init=self.n_init,
      n_hid=self.n_hid,
      n_blk_per_group=self.n_blk_per_group,
      vocab_size=self.vocab_size,
      dtype=self.dtype,
    )

  def __call__(
    self, images: jax.Array, *, temperature: float | jax.Array, train: bool = True
  ) -> dict[str, jax.Array]:
    """Encodes, relaxes, decodes.

    Args:
      images: [B, H, W, 3] in [0, 1], H and W multiples of 8.
      temperature: Gumbel-softmax temperature (may be traced).
      train: relaxed Gumbel-softmax codes (rng stream 'gumbel') if True; otherwise the
        hard one-hot argmax codes, i.e. what the tokenizer hands to BEiT.

    Returns:
      'logits' [B, h, w, V] of q(z|x); 'mu', 'log_scale' [B, H, W, 3] of the logit-Laplace
      over mapped pixels; 'recon' [B, H, W, 3] in [0, 1] (the distribution's median).
    """
    logits = self.encode(images)  # [B, h, w, V]
    if train:
      gumbel = jax.random.gumbel(self.make_rng("gumbel"), logits.shape, jnp.float32)
      z = jax.nn.softmax((logits + gumbel) / temperature, axis=-1)
    else:
      z = jax.nn.one_hot(jnp.argmax(logits, axis=-1), self.vocab_size, dtype=jnp.float32)
    mu, log_scale = jnp.split(self.decoder(z), 2, axis=-1)  # [B, H, W, 3] each
    return {
      "logits": logits,
      "mu": mu,
      "log_scale": log_scale,
      "recon": unmap_pixels(jax.nn.sigmoid(mu)),
    }

  def encode(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] in [0, 1] -> logits [B, H/8, W/8, V] (float32)."""
    return self.encoder(map_pixels(images))

  def decode_tokens(self, tokens: jax.Array) -> jax.Array:
    """int tokens [B, h, w] -> reconstructed images [B, 8h, 8w, 3] in [0, 1]."""
    if tokens.ndim != 3:
      raise ValueError(
        f"DiscreteVAE.decode_tokens: tokens {list(tokens.shape)}: expected [B, h, w]"
      )
    z = jax.nn.one_hot(tokens, self.vocab_size, dtype=jnp.float32)  # [B, h, w, V]
    mu, _ = jnp.split(self.decoder(z), 2, axis=-1)
    return unmap_pixels(jax.nn.sigmoid(mu))


def tokenize(params: Any, images: jax.Array, *, model: DiscreteVAE) -> jax.Array:
  """Frozen visual tokens: argmax of the encoder logits.

  Args:
    params: the `DiscreteVAE` params ({'encoder': ...}; a 'decoder' entry is ignored).
    images: [B, H, W, 3] in [0, 1] (not yet pixel-mapped).
    model: the `DiscreteVAE` the params belong to.

  Returns:
    int32 [B, H/8, W/8] in [0, vocab_size).
  """
  params = jax.lax.stop_gradient(params)
  logits = model.apply({"params": params}, images, method=DiscreteVAE.encode)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def logit_laplace_nll(x_mapped: jax.Array, mu: jax.Array, log_scale: jax.Array) -> jax.Array:
  """Per-element -log p(x) of the logit-Laplace density on (0, 1) (DALL-E, appendix A.3).

  logit(x) ~ Laplace(mu, b), b = exp(log_scale), so
  -log p(x) = log(2b) + |logit(x) - mu| / b + log(x (1 - x)).
  """
  x = x_mapped.astype(jnp.float32)
  log_x, log_1mx = jnp.log(x), jnp.log1p(-x)
  return (
    math.log(2.0)
    + log_scale
    + jnp.abs(log_x - log_1mx - mu) * jnp.exp(-log_scale)
    + log_x
    + log_1mx
  )


def kl_to_uniform(logits: jax.Array) -> jax.Array:
  """KL(softmax(logits) || uniform over V), averaged over all but the last axis."""
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(log_q) * log_q, axis=-1) + math.log(logits.shape[-1])
  return jnp.mean(kl)


def elbo_loss(
  outputs: dict[str, jax.Array], images: jax.Array, kl_weight: float | jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """beta-weighted negative ELBO, in nats per latent position.

  Both terms are the per-image sums of the ELBO divided by the same count, the number of
  latent positions h*w: 'recon_nll' is the logit-Laplace NLL summed over an image's
  pixels and channels / (h*w), 'kl' is KL(q(z|x) || uniform) summed over positions /
  (h*w); both are averaged over the batch. So their ratio is the DALL-E paper's and the
  KL weight (beta, 6.6 there) means the same for any image size.

  Args:
    outputs: `DiscreteVAE.__call__` outputs.
    images: [B, H, W, 3] in [0, 1] (the model's input).
    kl_weight: beta.

  Returns:
    (loss, metrics) with metrics 'recon_nll', 'kl', 'mse' (of 'recon' vs images, per
    pixel) and 'nelbo' (recon_nll + kl, i.e. beta = 1).
  """
  nll = logit_laplace_nll(map_pixels(images), outputs["mu"], outputs["log_scale"])
  batch, h, w, _ = outputs["logits"].shape
  recon_nll = jnp.sum(nll) / (batch * h * w)
  kl = kl_to_uniform(outputs["logits"])
  loss = recon_nll + kl_weight * kl
  metrics = {
    "recon_nll": recon_nll,
    "kl": kl,
    "nelbo": recon_nll + kl,
    "mse": jnp.mean(jnp.square(outputs["recon"] - images)),
  }
  return loss, metrics


def _cosine_interp(
  step: int | jax.Array, start: float, end: float, num_steps: int, where: str
) -> jax.Array:
  """start -> end along half a cosine over `num_steps`, then constant at `end`."""
  if num_steps < 0:
    raise ValueError(f"{where} {num_steps} is not >= 0")
  step = jnp.asarray(step, jnp.float32)
  if num_steps == 0:
    return jnp.full(step.shape, end, jnp.float32)
  frac = jnp.clip(step / num_steps, 0.0, 1.0)
  return end + (start - end) * 0.5 * (1 + jnp.cos(jnp.pi * frac))


def gumbel_temperature(
  step: int | jax.Array, *, start: float = 1.0, end: float = 1 / 16, anneal_steps: int
) -> jax.Array:
  """Relaxation temperature: cosine-annealed from `start` to `end` (DALL-E: 1 -> 1/16)."""
  return _cosine_interp(step, start, end, anneal_steps, "gumbel_temperature: anneal_steps")


def kl_weight(
  step: int | jax.Array, *, start: float = 0.0, end: float, warmup_steps: int
) -> jax.Array:
  """KL weight beta: cosine-increased from `start` to `end` (DALL-E: 0 -> 6.6 in 5000)."""
  return _cosine_interp(step, start, end, warmup_steps, "kl_weight: warmup_steps")
