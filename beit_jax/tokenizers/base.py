"""The registry entry a tokenizer kind provides (see `beit_jax.tokenizers`)."""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections

from beit_jax.data.views import View


@dataclasses.dataclass(frozen=True)
class Entry:
  """What one tokenizer kind provides; `model` below is what `build` returns."""

  build: Callable[[ml_collections.ConfigDict], nn.Module]  # config.tokenizer -> model
  init: Callable[[nn.Module, jax.Array, int], Any]  # (model, rng, view size) -> params
  tokenize: Callable[[nn.Module, Any, jax.Array], jax.Array]  # -> int32 [B, h, w]
  vocab_size: Callable[[Any], int]  # params -> number of codes
  grid: Callable[[ml_collections.ConfigDict], int]  # config.input -> token grid side
  view: Callable[[ml_collections.ConfigDict], View]  # config.input -> its input view
  # (model, params) -> params shaped like the model's (raises ConfigError naming the field).
  check_params: Callable[[nn.Module, Any, str], Any]
  owns: Callable[[Any], bool]  # params -> whether they are a checkpoint of this kind
  name: str  # for messages, e.g. "VQ-KD"
  # (model, params, int [B, h, w]) -> [B, H, W, 3] in [0, 1]; None: cannot draw tokens.
  decode: Callable[[nn.Module, Any, jax.Array], jax.Array | None] | None = None
  # config.tokenizer -> what the view's side must be a multiple of (e.g. the dVAE's 8x).
  image_multiple: Callable[[ml_collections.ConfigDict], int] = lambda tok: 1
  trainer: str = ""  # the trainer that trains this kind ('' : import it, e.g. convert)
  rules: tuple = ()
