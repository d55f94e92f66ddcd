"""BEiT v2's VQ-KD as a tokenizer kind: the crop at `input.tokenizer_image_size`, bicubic,
in [-1, 1] (unilm's view); tokens are the nearest codes of the encoder's patch outputs.

Params. A VQ-KD tokenizer's params are its flax variables, both collections:

  {'params': {encoder, encode_task_layer_*, decoder, decode_task_layer_*},
   'codebook': {'embedding': [K, C], 'cluster_size': [K], 'initted': []}}

This is also what `trainer="vqkd"` keeps as the train state's params (the optimizer
leaves 'codebook' alone; EMA updates it) and so what its checkpoints hold: a VQ-KD
workdir is loaded by `tokenizers.load` as it is, and `tokenize(params, images)` runs
inside the MIM step with this tree as the jitted step's argument.

Sizes. `build` reads `config.tokenizer` (`vocab_size` is the number of codes K,
`code_dim` C, `teacher_dim`, `patch_size`, `encoder.*`, `decoder.*`); the image side
is not a tokenizer field: `init` takes the view size, and `tokenize` reads the grid from
the weights' position embedding (a mismatch with the images is a one-line error naming
`input.tokenizer_image_size`). The token grid is `input.tokenizer_image_size /
input.patch_size`: VQ-KD configs set `tokenizer.patch_size` equal to `input.patch_size`
(the VQ-KD trainer checks it). VQ-KD cannot draw pixels: no `decode`.
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from beit_jax import params as params_lib
from beit_jax.training import validate
from beit_jax.data.views import View
from beit_jax.errors import ConfigError
from beit_jax.models import vqkd
from beit_jax.tokenizers.base import Entry


def _build(tok: ml_collections.ConfigDict) -> vqkd.VQKD:
  enc, dec = tok.encoder, tok.decoder
  return vqkd.VQKD(
    patch_size=tok.patch_size,
    width=enc.width,
    depth=enc.depth,
    num_heads=enc.num_heads,
    mlp_dim=enc.mlp_dim,
    decoder_width=dec.width,
    decoder_depth=dec.depth,
    decoder_num_heads=dec.num_heads,
    decoder_mlp_dim=dec.mlp_dim,
    num_codes=tok.vocab_size,
    code_dim=tok.code_dim,
    teacher_dim=tok.teacher_dim,
    beta=tok.beta,
  )


def sized(model: vqkd.VQKD, image_size: int) -> vqkd.VQKD:
  """The model at `image_size` (its position embeddings' grid)."""
  return model if model.image_size == image_size else model.clone(image_size=image_size)


def _init(model: vqkd.VQKD, rng: jax.Array, size: int) -> dict[str, Any]:
  model = sized(model, size)
  grid = size // model.patch_size
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  teacher = jnp.zeros((1, grid * grid, model.teacher_dim), jnp.float32)
  return dict(model.init({"params": rng}, images, teacher))


def is_vqkd_params(params: Any) -> bool:
  return (
    isinstance(params, dict)
    and isinstance(params.get("codebook"), dict)
    and ("embedding" in params["codebook"])
  )


def _owns(params: Any) -> bool:
  return (
    is_vqkd_params(params)
    and isinstance(params.get("params"), dict)
    and "encoder" in params["params"]
  )


def _vocab_size(params: Any) -> int:
  return int(params["codebook"]["embedding"].shape[0])


def image_size_of(params: Any) -> int:
  """The image side VQ-KD params were built for, from the encoder's position embedding."""
  enc = params["params"]["encoder"]
  n = int(enc["pos_embed"].shape[1]) - 1
  side = round(n**0.5)
  return side * int(enc["patch_embed"]["kernel"].shape[0])


def _depth(tree: dict) -> int:
  return sum(1 for k in tree if re.fullmatch(r"blocks_\d+", k))


def _sizes(params: Any) -> dict[str, int]:
  """Config field -> the value the weights have."""
  p = params["params"]
  enc, dec = p["encoder"], p["decoder"]
  out = {
    "tokenizer.code_dim": params["codebook"]["embedding"].shape[1],
    "tokenizer.patch_size": enc["patch_embed"]["kernel"].shape[0],
    "tokenizer.encoder.width": enc["cls_token"].shape[-1],
    "tokenizer.encoder.depth": _depth(enc),
    "tokenizer.decoder.width": dec["cls_token"].shape[-1],
    "tokenizer.decoder.depth": _depth(dec),
    "tokenizer.teacher_dim": p["decode_task_layer_2"]["kernel"].shape[-1],
  }
  if "blocks_0" in enc:
    out["tokenizer.encoder.mlp_dim"] = enc["blocks_0"]["mlp"]["fc1"]["kernel"].shape[-1]
  if "blocks_0" in dec:
    out["tokenizer.decoder.mlp_dim"] = dec["blocks_0"]["mlp"]["fc1"]["kernel"].shape[-1]
  return {k: int(v) for k, v in out.items()}


def _configured(model: vqkd.VQKD) -> dict[str, int]:
  return {
    "tokenizer.code_dim": model.code_dim,
    "tokenizer.patch_size": model.patch_size,
    "tokenizer.encoder.width": model.width,
    "tokenizer.encoder.depth": model.depth,
    "tokenizer.decoder.width": model.decoder_width,
    "tokenizer.decoder.depth": model.decoder_depth,
    "tokenizer.teacher_dim": model.teacher_dim,
    "tokenizer.encoder.mlp_dim": model.mlp_dim,
    "tokenizer.decoder.mlp_dim": model.decoder_mlp_dim,
  }


def _check_params(model: vqkd.VQKD, params: Any, field: str) -> Any:
  """Every size against the config: one line naming the field (the registry has checked
  the checkpoint's kind)."""
  try:
    got = _sizes(params)
    size = image_size_of(params)
  except (KeyError, IndexError, TypeError, AttributeError) as e:
    raise ConfigError(f"{field}: not a complete VQ-KD tokenizer (missing {e})") from None
  want = _configured(model)
  for name, value in got.items():
    if value != want[name]:
      raise ConfigError(
        f"{name}={want[name]} but the tokenizer at {field} has {value} "
        f"(set --config.{name}={value})"
      )
  abstract = jax.eval_shape(lambda rng: _init(model, rng, size), jax.random.key(0))
  return params_lib.cast(abstract, params, field)


def tokenize(model: vqkd.VQKD, params: Any, images: jax.Array) -> jax.Array:
  """[B, S, S, 3] in [-1, 1] -> int32 [B, S/p, S/p] codes (jit-safe: shapes are static)."""
  size = image_size_of(params)
  if images.shape[1:3] != (size, size):
    raise ConfigError(
      f"input.tokenizer_image_size={images.shape[1]} but the VQ-KD "
      f"tokenizer's weights are for {size}x{size} images"
    )
  return vqkd.tokenize(params, images, model=sized(model, size))


_POS = validate.POSITIVE_INT
ENTRY = Entry(
  build=_build,
  init=_init,
  tokenize=tokenize,
  vocab_size=_vocab_size,
  grid=lambda inp: inp.tokenizer_image_size // inp.patch_size,
  view=lambda inp: View(inp.tokenizer_image_size, "bicubic", "signed"),
  check_params=_check_params,
  owns=_owns,
  name="VQ-KD",
  decode=None,
  trainer="vqkd",
  image_multiple=lambda tok: tok.patch_size,
  rules=(
    ("tokenizer.code_dim", *_POS),
    ("tokenizer.teacher_dim", *_POS),
    ("tokenizer.patch_size", *_POS),
    ("tokenizer.beta", validate.number(0), "a number >= 0"),
    *(
      (f"tokenizer.{part}.{size}", *_POS)
      for part in ("encoder", "decoder")
      for size in ("width", "depth", "num_heads", "mlp_dim")
    ),
  ),
)
