"""The DALL-E discrete VAE as a tokenizer kind (BEiT v1): 112-px Lanczos view in [0, 1]."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from beit_jax import params as params_lib
from beit_jax.training import validate
from beit_jax.data.views import View
from beit_jax.models import dvae
from beit_jax.tokenizers.base import Entry

DOWNSAMPLING = 8  # the encoder's max-pools: 112 px -> a 14x14 token grid


def _build(tok: ml_collections.ConfigDict) -> dvae.DiscreteVAE:
  return dvae.DiscreteVAE(
    vocab_size=tok.vocab_size,
    n_hid=tok.n_hid,
    n_blk_per_group=tok.n_blk_per_group,
    n_init=tok.n_init,
  )


def _init(model: dvae.DiscreteVAE, rng: jax.Array, size: int) -> Any:
  return model.init({"params": rng, "gumbel": rng}, jnp.zeros((1, size, size, 3)), temperature=1.0)[
    "params"
  ]


def _vocab_size(params: Any) -> int:
  """Codebook size of dVAE params: the encoder's output channels."""
  leaves = jax.tree_util.tree_leaves_with_path(params["encoder"])
  out_kernels = [x for p, x in leaves if "output" in jax.tree_util.keystr(p) and x.ndim == 4]
  return int(out_kernels[-1].shape[-1])


def _check_params(model: dvae.DiscreteVAE, params: Any, field: str) -> Any:
  """Encoder (+ decoder, if present: an encoder-only conversion tokenizes but cannot draw)."""
  rngs, dummy = {"params": jax.random.key(0)}, jnp.zeros((1, 8, 8, 3))
  abstract = jax.eval_shape(
    lambda: (
      model.init(rngs, dummy, temperature=1.0, train=False)
      if "decoder" in params
      else model.init(rngs, dummy, method=dvae.DiscreteVAE.encode)
    )
  )["params"]
  return params_lib.cast(abstract, params, field)


def _decode(model: dvae.DiscreteVAE, params: Any, tokens: jax.Array) -> jax.Array | None:
  if "decoder" not in params:
    return None
  return model.apply({"params": params}, tokens, method=model.decode_tokens)


ENTRY = Entry(
  build=_build,
  init=_init,
  tokenize=lambda model, params, images: dvae.tokenize(params, images, model=model),
  vocab_size=_vocab_size,
  grid=lambda inp: inp.tokenizer_image_size // DOWNSAMPLING,
  view=lambda inp: View(inp.tokenizer_image_size, "lanczos3", "unit"),
  check_params=_check_params,
  decode=_decode,
  trainer="dvae",
  name="dVAE",
  owns=lambda params: isinstance(params, dict) and "encoder" in params,
  rules=(
    (
      "tokenizer.n_hid",
      lambda v: validate.number(4, integer=True)(v) and v % 4 == 0,
      "a positive multiple of 4",
    ),
  ),
  image_multiple=lambda tok: DOWNSAMPLING,
)
