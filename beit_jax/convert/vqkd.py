"""microsoft/unilm BEiT v2 VQ-KD tokenizer checkpoints -> a beit-jax "vqkd" tokenizer.

unilm `beit2/modeling_vqkd.py` (VQKD, e.g. `vqkd_encoder_base_decoder_3x768x12_clip`) and
`norm_ema_quantizer.py` name their tensors

  encoder.{cls_token, pos_embed, patch_embed.proj.*, blocks.i.*, fc_norm.*}
  encode_task_layer.{0,2}.*                    Linear, Tanh, Linear
  decoder.{...as the encoder...}               patch size 1 over the code grid
  decode_task_layer.{0,2}.*
  quantize.embedding.weight [K, C]             the codebook
  quantize.cluster_size [K]                    EMA of per-step code counts (usage)
  quantize.embedding.initted [1]               k-means done
  quantize.embedding.{cluster_size, embed_avg} unused by the forward: dropped
  teacher_model.*, scaling_layer.*, loss.*     the frozen teacher: dropped (as unilm does)

and become the variables of `beit_jax/models/vqkd.py`: {'params': {encoder,
encode_task_layer_0, ...}, 'codebook': {embedding, cluster_size, initted}}, which is what
`tokenizers.load` reads for `tokenizer.kind="vqkd"`. Sizes come from the weights; the head
count (no weight records it) is the standard one of the width unless given.
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from beit_jax.training import checkpoint
from beit_jax.convert import common
from beit_jax.convert import unilm
from beit_jax.errors import ConfigError
from beit_jax.models import vqkd

KIND = "vqkd"
_CODEBOOK = "quantize.embedding.weight"
# What unilm's `as_tokenzer` loading deletes, and the quantizer's unused EMA buffers.
_DROPPED = re.compile(r"^(loss|teacher|scaling)|^quantize\.embedding\.(cluster_size|embed_avg)$")


def is_vqkd(sd: common.StateDict) -> bool:
  """Whether a unilm state dict is a VQ-KD tokenizer (rather than a BEiT ViT)."""
  return _CODEBOOK in sd or (any(k.startswith("encoder.") for k in sd) and "cls_token" not in sd)


def _feature_vit_rules(p: str, k: str, depth: int) -> list[unilm.Rule]:
  kw = dict(use_rel_pos_bias=False, layer_scale_init=0.0)
  out = [
    unilm.Rule(f"{p}/patch_embed/kernel", f"{k}.patch_embed.proj.weight", (2, 3, 1, 0)),
    unilm.Rule(f"{p}/patch_embed/bias", f"{k}.patch_embed.proj.bias"),
    unilm.Rule(f"{p}/cls_token", f"{k}.cls_token"),
    unilm.Rule(f"{p}/pos_embed", f"{k}.pos_embed"),
    unilm.Rule(f"{p}/fc_norm/scale", f"{k}.fc_norm.weight"),
    unilm.Rule(f"{p}/fc_norm/bias", f"{k}.fc_norm.bias"),
  ]
  for i in range(depth):
    out += unilm.block_rules(f"{p}/blocks_{i}", f"{k}.blocks.{i}", kw)
  return out


def _task_rules(name: str) -> list[unilm.Rule]:
  return [
    r
    for i in (0, 2)
    for r in (
      unilm.Rule(f"params/{name}_{i}/kernel", f"{name}.{i}.weight", (1, 0)),
      unilm.Rule(f"params/{name}_{i}/bias", f"{name}.{i}.bias"),
    )
  ]


def rules(fields: dict[str, Any]) -> list[unilm.Rule]:
  """Variable path <-> unilm key of a VQ-KD with `fields` (the codebook rules last)."""
  return (
    _feature_vit_rules("params/encoder", "encoder", fields["encoder"]["depth"])
    + _task_rules("encode_task_layer")
    + _feature_vit_rules("params/decoder", "decoder", fields["decoder"]["depth"])
    + _task_rules("decode_task_layer")
    + [
      unilm.Rule("codebook/embedding", _CODEBOOK),
      unilm.Rule("codebook/cluster_size", "quantize.cluster_size"),
    ]
  )


def _need(sd: common.StateDict, key: str, what: str) -> np.ndarray:
  if key not in sd:
    raise ConfigError(f"{what} is not a complete VQ-KD tokenizer: no {key}")
  return sd[key]


def _vit_sizes(sd: common.StateDict, part: str, what: str, num_heads: int | None) -> dict[str, int]:
  width = _need(sd, f"{part}.cls_token", what).shape[-1]
  depth = 1 + max(
    (int(m.group(1)) for k in sd if (m := re.match(rf"{part}\.blocks\.(\d+)\.", k))), default=-1
  )
  if depth == 0:
    raise ConfigError(f"{what}: the {part} has no transformer blocks ({part}.blocks.0.*)")
  heads = num_heads or unilm._HEADS_OF_WIDTH.get(width)  # pylint: disable=protected-access
  if heads is None:
    raise ConfigError(
      f"{what}: cannot tell the number of heads of the {part}'s width {width}; pass --num_heads"
    )
  if width % heads:
    raise ConfigError(f"{what}: the {part}'s width {width} is not divisible by num_heads={heads}")
  return dict(
    width=int(width),
    depth=int(depth),
    num_heads=int(heads),
    mlp_dim=int(_need(sd, f"{part}.blocks.0.mlp.fc1.weight", what).shape[0]),
  )


def _grid(sd: common.StateDict, part: str, what: str) -> int:
  n = _need(sd, f"{part}.pos_embed", what).shape[1] - 1
  side = int(round(n**0.5))
  if side * side != n:
    raise ConfigError(f"{what}: {part}.pos_embed implies {n} patches, not a square grid")
  return side


def infer_fields(
  sd: common.StateDict, what: str, *, num_heads: int | None = None
) -> dict[str, Any]:
  """The tokenizer config fields (`config.tokenizer.*`) and image size of a VQ-KD state dict.

  Raises ConfigError when its parts do not fit together: the codebook dimension against
  the encoder's output and the decoder's input, the decoder's grid against the encoder's.
  """
  codebook = _need(sd, _CODEBOOK, what)  # [K, C]
  num_codes, code_dim = (int(d) for d in codebook.shape)
  patch = int(_need(sd, "encoder.patch_embed.proj.weight", what).shape[-1])
  enc = _vit_sizes(sd, "encoder", what, num_heads)
  dec = _vit_sizes(sd, "decoder", what, num_heads)
  out_dim = int(_need(sd, "encode_task_layer.2.weight", what).shape[0])
  if out_dim != code_dim:
    raise ConfigError(
      f"{what}: encode_task_layer.2 outputs {out_dim}-d codes but the "
      f"codebook {_CODEBOOK} is {num_codes} x {code_dim}"
    )
  dec_in = _need(sd, "decoder.patch_embed.proj.weight", what).shape  # [D', C, 1, 1]
  if dec_in[1] != code_dim or dec_in[2:] != (1, 1):
    raise ConfigError(
      f"{what}: decoder.patch_embed.proj.weight has shape {tuple(dec_in)}; "
      f"the decoder must take the {code_dim}-d codes of {_CODEBOOK} "
      f"through a 1x1 patch embedding"
    )
  grid, dec_grid = _grid(sd, "encoder", what), _grid(sd, "decoder", what)
  if dec_grid != grid:
    raise ConfigError(
      f"{what}: the decoder's position embedding is for a {dec_grid}x"
      f"{dec_grid} grid, the encoder's for {grid}x{grid}"
    )
  teacher_dim = int(_need(sd, "decode_task_layer.2.weight", what).shape[0])
  return dict(
    kind=KIND,
    vocab_size=num_codes,
    code_dim=code_dim,
    teacher_dim=teacher_dim,
    patch_size=patch,
    encoder=enc,
    decoder=dec,
    image_size=grid * patch,
  )


def build(fields: dict[str, Any]) -> vqkd.VQKD:
  enc, dec = fields["encoder"], fields["decoder"]
  return vqkd.VQKD(
    image_size=fields["image_size"],
    patch_size=fields["patch_size"],
    width=enc["width"],
    depth=enc["depth"],
    num_heads=enc["num_heads"],
    mlp_dim=enc["mlp_dim"],
    decoder_width=dec["width"],
    decoder_depth=dec["depth"],
    decoder_num_heads=dec["num_heads"],
    decoder_mlp_dim=dec["mlp_dim"],
    num_codes=fields["vocab_size"],
    code_dim=fields["code_dim"],
    teacher_dim=fields["teacher_dim"],
  )


def expected_shapes(fields: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """Flat variable path ('params/encoder/...', 'codebook/...') -> shape, from the model."""
  model, size = build(fields), fields["image_size"]
  grid = size // fields["patch_size"]
  shapes = jax.eval_shape(
    model.init,
    jax.random.key(0),
    jnp.zeros((1, size, size, 3)),
    jnp.zeros((1, grid * grid, fields["teacher_dim"])),
  )
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def to_variables(sd: common.StateDict, fields: dict[str, Any], what: str) -> dict[str, Any]:
  """A unilm VQ-KD state dict -> nested beit-jax VQ-KD variables (checked key by key)."""
  expected = expected_shapes(fields)
  flat, missing = {}, []
  for rule in rules(fields):
    if rule.key not in sd:
      missing.append(rule.key)
      continue
    want = rule.torch_shape(expected[rule.path])
    if tuple(sd[rule.key].shape) != want:
      raise ConfigError(
        f"{what}: {rule.key} has shape {tuple(sd[rule.key].shape)}, expected {want}"
      )
    flat[rule.path] = rule.to_flax(sd[rule.key])
  if "quantize.cluster_size" in missing:  # unilm's statistic_code_usage=False
    missing.remove("quantize.cluster_size")
    flat["codebook/cluster_size"] = np.zeros(expected["codebook/cluster_size"], np.float32)
    logging.warning("%s: no quantize.cluster_size (code usage); set to zeros", what)
  initted = sd.get("quantize.embedding.initted")
  flat["codebook/initted"] = np.asarray(
    True if initted is None else bool(np.asarray(initted).reshape(-1)[0])
  )
  used = {r.key for r in rules(fields)} | {"quantize.embedding.initted"}
  dropped = sorted(k for k in sd if _DROPPED.search(k))
  unexpected = [k for k in sd if k not in used and k not in dropped]
  common.check_keys(what, missing=missing, unexpected=unexpected)
  if dropped:
    logging.info("%s: not part of the tokenizer, dropped: %s", what, common.listing(dropped))
  if not flat["codebook/initted"]:
    logging.warning("%s: its codebook was never initialised (initted=0)", what)
  return traverse_util.unflatten_dict(flat, sep="/")


def load(
  sd: common.StateDict, what: str, *, num_heads: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables, fields) of a unilm VQ-KD state dict."""
  if not is_vqkd(sd) or _CODEBOOK not in sd:
    raise ConfigError(
      f"{what} is not a VQ-KD tokenizer: no {_CODEBOOK} (keys: {common.listing(sd)})"
    )
  fields = infer_fields(sd, what, num_heads=num_heads)
  return to_variables(sd, fields, what), fields


def save(path: str, variables: dict[str, Any], fields: dict[str, Any], source: str) -> None:
  """A beit-jax checkpoint that `config.tokenizer.init_from` (kind "vqkd") reads."""
  common.ensure_new_dir(path, "output folder")
  checkpoint.save_params(path, variables, {"converted_from": source, "tokenizer": fields})


def config_flags(fields: dict[str, Any]) -> str:
  """The `--config.*` overrides of a MIM run whose tokenizer these weights are."""
  flags = {
    f"tokenizer.{k}": fields[k]
    for k in ("kind", "vocab_size", "code_dim", "teacher_dim", "patch_size")
  }
  for part in ("encoder", "decoder"):
    flags.update({f"tokenizer.{part}.{k}": v for k, v in fields[part].items()})
  flags["input.tokenizer_image_size"] = fields["image_size"]
  return " ".join(f"--config.{k}={v}" for k, v in flags.items())
