"""The frozen tokenizer a MIM run predicts: built from `config.tokenizer`, loaded or trained.

Every tokenizer exposes `tokenize(params, images) -> int32 [B, h, w]`, run on device
inside the MIM train step.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath

from beit_jax import checkpoint
from beit_jax.errors import ConfigError
from beit_jax.models import dvae

KINDS = ("dvae",)


def build(tok: ml_collections.ConfigDict) -> dvae.DiscreteVAE:
  if tok.kind not in KINDS:
    raise ConfigError(f"tokenizer.kind={tok.kind!r} is not supported; accepted: {KINDS}")
  return dvae.DiscreteVAE(vocab_size=tok.vocab_size, n_hid=tok.n_hid,
                          n_blk_per_group=tok.n_blk_per_group, n_init=tok.n_init)


def grid_size(tok: ml_collections.ConfigDict, inp: ml_collections.ConfigDict) -> int:
  """Side of the token grid for the tokenizer's input view (the dVAE downsamples 8x)."""
  if tok.kind not in KINDS:
    raise ConfigError(f"tokenizer.kind={tok.kind!r} is not supported; accepted: {KINDS}")
  return inp.tokenizer_image_size // 8


def tokenize_fn(model: dvae.DiscreteVAE) -> Callable[[Any, jax.Array], jax.Array]:
  def tokenize(params, images):  # [B, H, W, 3] in [0, 1] -> int32 [B, h, w]
    return dvae.tokenize(params, images, model=model)
  return tokenize


def vocab_size_of(params: Any) -> int:
  """Codebook size of loaded dVAE params (the encoder's output channels)."""
  leaves = jax.tree_util.tree_leaves_with_path(params["encoder"])
  out_kernels = [x for p, x in leaves if "output" in jax.tree_util.keystr(p)
                 and x.ndim == 4]
  return int(out_kernels[-1].shape[-1])


def load_or_train(config: ml_collections.ConfigDict, workdir: str
                  ) -> tuple[dvae.DiscreteVAE, Any]:
  """Stage 1: the tokenizer named by `tokenizer.init_from`, or one trained now.

  Without `init_from`, the dVAE is trained (or its training resumed) in
  `<workdir>/tokenizer` with `config.tokenizer.train`, so one command runs both
  stages and a restarted run does not train the tokenizer twice.
  """
  from beit_jax.trainers import dvae as dvae_trainer  # pylint: disable=g-import-not-at-top
  tok = config.tokenizer
  model = build(tok)
  source = tok.get("init_from") or ""
  if not source:
    source = str(epath.Path(workdir) / "tokenizer")
    logging.info("Stage 1: training the dVAE tokenizer in %s", source)
    dvae_trainer.train_and_evaluate(config, source)
  elif not epath.Path(source).exists():
    raise ConfigError(f"tokenizer.init_from={source} does not exist")
  params = checkpoint.load_params(source)
  got = vocab_size_of(params)
  if got != tok.vocab_size:
    raise ConfigError(f"tokenizer.vocab_size={tok.vocab_size} but the tokenizer at "
                      f"{source} has {got} codes")
  logging.info("Tokenizer: %s from %s", tok.kind, source)
  return model, jax.tree.map(jnp.asarray, params)
