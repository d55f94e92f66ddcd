"""microsoft/unilm BEiT / BEiT v2 state dicts <-> beit-jax ViT params.

unilm's layout is the hub of the ViT converters: HF checkpoints are renamed to it
(`hf.py`) and exported from it. Key names and layouts are those of unilm
`beit/modeling_pretrain.py` (VisionTransformerForMaskedImageModeling: `mask_token`,
shared `rel_pos_bias.*`, `norm`, `lm_head`) and `beit/modeling_finetune.py`
(VisionTransformer: per-block `blocks.i.attn.relative_position_bias_table`,
`fc_norm`, `head`, no mask token). BEiT v2 pretraining checkpoints (`beit2/
modeling_pretrain.py` VisionTransformerForMaskedImageModelingCLS) add the
patch-aggregation decoder `cls_pt_layers.j.*` (blocks like the backbone's); beit-jax
keeps it as `cls_pt_layers_j/...` when the model fields have `patch_aggregation_layer`
(`patch_aggregation_kwargs`), and drops it otherwise.
"""

import argparse
import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from beit_jax.convert import common
from beit_jax.errors import ConfigError
from beit_jax.models import vit

_CONV = (2, 3, 1, 0)  # torch [out, in, kh, kw] -> flax [kh, kw, in, out]
_LINEAR = (1, 0)  # torch [out, in] -> flax [in, out]
# A head count per width where the weights do not tell (no relative position table).
_HEADS_OF_WIDTH = {s["width"]: s["num_heads"] for s in vit.VARIANTS.values()}
# unilm's outer checkpoint keys (its `--model_key` default is 'model|module').
_WRAPPERS = ("model", "module", "state_dict")
# BEiT v2's patch-aggregation decoder: thrown away after pretraining (docs/reference.md §4).
_V2_DECODER = re.compile(r"^cls_pt_(layers|norm|lm_head)\.")
_V2_DECODER_BLOCK = re.compile(r"^cls_pt_layers\.(\d+)\.")
# The model fields of the decoder (VisionTransformer's); absent: no decoder.
PATCH_AGGREGATION_FIELDS = ("patch_aggregation_layer", "patch_aggregation_depth")
# unilm PRETRAINING.md's --early_layers for the standard depths (when a checkpoint's
# args do not say).
_STANDARD_EARLY_LAYERS = {12: 9, 24: 21}
# Keys that may be absent: their zero value is what the model computes without them
# (unilm's fine-tuning model has no mask token; qkv_bias=False has no q/v bias).
_ZERO_IF_ABSENT = re.compile(r"^(mask_token|blocks\.\d+\.attn\.[qv]_bias)$")
_INDEX = re.compile(r"^(rel_pos_bias|(blocks|cls_pt_layers)\.\d+\.attn)\.relative_position_index$")


class Rule(NamedTuple):
  """One beit-jax param <- one unilm tensor, transposed by `perm` (None: as is).

  `split3`: the fused qkv weight, whose [D, 3D] beit-jax keeps as [D, 3, D].
  """

  path: str
  key: str
  perm: tuple[int, ...] | None = None
  split3: bool = False

  def to_flax(self, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value if self.perm is None else np.transpose(value, self.perm), np.float32)
    return value.reshape(value.shape[0], 3, -1) if self.split3 else value

  def to_torch(self, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if self.split3:
      value = value.reshape(value.shape[0], -1)
    return np.ascontiguousarray(
      value if self.perm is None else np.transpose(value, np.argsort(self.perm))
    )

  def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if self.split3:
      flax_shape = (flax_shape[0], flax_shape[1] * flax_shape[2])
    if self.perm is None:
      return tuple(flax_shape)
    return tuple(flax_shape[i] for i in np.argsort(self.perm))


def rules(kw: dict[str, Any]) -> list[Rule]:
  """The param <-> key correspondence of a VisionTransformer with fields `kw`."""
  out = [
    Rule("patch_embed/kernel", "patch_embed.proj.weight", _CONV),
    Rule("patch_embed/bias", "patch_embed.proj.bias"),
    Rule("cls_token", "cls_token"),
    Rule("mask_token", "mask_token"),
  ]

  def linear(path, key):
    return [Rule(f"{path}/kernel", f"{key}.weight", _LINEAR), Rule(f"{path}/bias", f"{key}.bias")]

  def norm(path, key):
    return [Rule(f"{path}/scale", f"{key}.weight"), Rule(f"{path}/bias", f"{key}.bias")]

  if kw["use_abs_pos_emb"]:
    out.append(Rule("pos_embed", "pos_embed"))
  if kw["use_shared_rel_pos_bias"]:
    out.append(
      Rule("rel_pos_bias/relative_position_bias_table", "rel_pos_bias.relative_position_bias_table")
    )
  for i in range(kw["depth"]):
    out += block_rules(f"blocks_{i}", f"blocks.{i}", kw)
  out += decoder_rules(kw)
  if kw["num_classes"] > 0:
    out += norm("fc_norm", "fc_norm") + linear("head", "head")
  else:
    out += norm("norm", "norm")
  if kw["vocab_size"] > 0:
    out += linear("lm_head", "lm_head")
  return out


def block_rules(p: str, k: str, kw: dict[str, Any]) -> list[Rule]:
  """One `Block` at param path `p` <-> unilm block `k`."""

  def linear(path, key):
    return [Rule(f"{path}/kernel", f"{key}.weight", _LINEAR), Rule(f"{path}/bias", f"{key}.bias")]

  def norm(path, key):
    return [Rule(f"{path}/scale", f"{key}.weight"), Rule(f"{path}/bias", f"{key}.bias")]

  out = norm(f"{p}/norm1", f"{k}.norm1") + norm(f"{p}/norm2", f"{k}.norm2")
  out += [
    Rule(f"{p}/attn/qkv/kernel", f"{k}.attn.qkv.weight", _LINEAR, split3=True),
    Rule(f"{p}/attn/q_bias", f"{k}.attn.q_bias"),
    Rule(f"{p}/attn/v_bias", f"{k}.attn.v_bias"),
  ]
  out += linear(f"{p}/attn/proj", f"{k}.attn.proj")
  if kw["use_rel_pos_bias"]:
    out.append(
      Rule(f"{p}/attn/relative_position_bias_table", f"{k}.attn.relative_position_bias_table")
    )
  out += linear(f"{p}/mlp/fc1", f"{k}.mlp.fc1") + linear(f"{p}/mlp/fc2", f"{k}.mlp.fc2")
  if kw["layer_scale_init"] > 0:
    out += [Rule(f"{p}/gamma_1", f"{k}.gamma_1"), Rule(f"{p}/gamma_2", f"{k}.gamma_2")]
  return out


def decoder_rules(kw: dict[str, Any]) -> list[Rule]:
  """The patch-aggregation decoder's rules (none without `patch_aggregation_layer`)."""
  if not kw.get("patch_aggregation_layer"):
    return []
  return [
    r
    for j in range(kw.get("patch_aggregation_depth", 2))
    for r in block_rules(f"cls_pt_layers_{j}", f"cls_pt_layers.{j}", kw)
  ]


def without_patch_aggregation(kw: dict[str, Any]) -> dict[str, Any]:
  """The fields of the backbone alone (fine-tuning, HF export)."""
  return {k: v for k, v in kw.items() if k not in PATCH_AGGREGATION_FIELDS}


def has_patch_aggregation(sd: common.StateDict) -> bool:
  return any(_V2_DECODER.match(k) for k in sd)


def patch_aggregation_kwargs(
  sd: common.StateDict,
  kw: dict[str, Any],
  what: str,
  *,
  layer: int | None = None,
  checkpoint_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """The decoder's model fields of a BEiT v2 pretraining state dict ({} if it has none).

  The depth is the number of `cls_pt_layers.j` blocks. The aggregated layer is not in any
  weight: `layer` (the --patch_aggregation_layer flag), else the checkpoint's own
  `args.early_layers` (unilm saves its argparse args), else unilm's value for a standard
  depth (9 of 12, 21 of 24; a warning).
  """
  if not has_patch_aggregation(sd):
    return {}
  if any(k.startswith(("cls_pt_norm.", "cls_pt_lm_head.")) for k in sd):
    raise ConfigError(
      f"{what} has its own patch-aggregation norm and head (cls_pt_norm, "
      "cls_pt_lm_head: unilm --shared_lm_head False); beit-jax shares the "
      "final norm and MIM head: convert with --patch_aggregation=drop"
    )
  blocks = {int(m.group(1)) for k in sd if (m := _V2_DECODER_BLOCK.match(k))}
  if blocks != set(range(len(blocks))):
    raise ConfigError(
      f"{what}: patch-aggregation blocks cls_pt_layers.{sorted(blocks)} are not numbered 0..n-1"
    )
  args = checkpoint_args or {}
  if args.get("head_layers") not in (None, len(blocks)):
    raise ConfigError(
      f"{what}: args.head_layers={args['head_layers']} but it holds "
      f"{len(blocks)} cls_pt_layers blocks"
    )
  source = "--patch_aggregation_layer"
  if layer is None and args.get("early_layers") is not None:
    layer, source = int(args["early_layers"]), "its args.early_layers"
  if layer is None and kw["depth"] in _STANDARD_EARLY_LAYERS:
    layer = _STANDARD_EARLY_LAYERS[kw["depth"]]
    logging.warning(
      "%s: the aggregated layer is not recorded; assuming unilm's "
      "--early_layers %d for depth %d (else pass --patch_aggregation_layer)",
      what,
      layer,
      kw["depth"],
    )
    source = "unilm's default"
  if layer is None:
    raise ConfigError(
      f"{what} has a patch-aggregation decoder but does not record which "
      f"block it reads (args.early_layers); pass --patch_aggregation_layer"
    )
  if not 1 <= layer <= kw["depth"]:
    raise ConfigError(
      f"{what}: patch aggregation layer {layer} ({source}) must be in 1..{kw['depth']} (the depth)"
    )
  return dict(patch_aggregation_layer=layer, patch_aggregation_depth=len(blocks))


def unwrap(obj: Any, what: str) -> dict[str, Any]:
  """The state dict inside a checkpoint: unilm nests it under 'model' (or 'module')."""
  if not isinstance(obj, dict):
    raise ConfigError(f"{what} holds a {type(obj).__name__}, not a state dict")
  for key in _WRAPPERS:
    if isinstance(obj.get(key), dict):
      return obj[key]
  return obj


def _grid_side(count: int, what: str, source: str) -> int:
  side = math.isqrt(count)
  if side * side != count:
    raise ConfigError(f"{what}: {source} implies {count} patches, not a square grid")
  return side


def _infer_grid(sd: common.StateDict, what: str) -> int | None:
  """The patch grid side the position parameters were trained for, if any."""
  if "pos_embed" in sd:
    return _grid_side(sd["pos_embed"].shape[1] - 1, what, "pos_embed")
  for key in (
    "rel_pos_bias.relative_position_bias_table",
    "blocks.0.attn.relative_position_bias_table",
  ):
    if key in sd:
      rows = sd[key].shape[0] - 3  # (2g-1)^2
      return (_grid_side(rows, what, key) + 1) // 2
  return None


def infer_model_kwargs(
  sd: common.StateDict,
  what: str,
  *,
  num_heads: int | None = None,
  image_size: int | None = None,
  fallback_image_size: int | None = None,
) -> dict[str, Any]:
  """VisionTransformer fields from the tensors of a unilm-layout state dict.

  Args:
    sd: the state dict.
    what: how errors name the source.
    num_heads: needed only when no relative position table tells it; checked
      against the table otherwise.
    image_size: the source's image size if known (e.g. from a config): checked
      against the position parameters.
    fallback_image_size: used, unchecked, only when neither `image_size` nor any
      position parameter tells the grid (then no weight depends on it).

  Returns:
    dict of patch_size, width, depth, num_heads, mlp_dim, image_size, vocab_size,
    num_classes, use_abs_pos_emb, use_shared_rel_pos_bias, use_rel_pos_bias,
    layer_scale_init.
  """
  if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
    raise ConfigError(
      f"{what} is not a BEiT state dict: no cls_token / "
      f"patch_embed.proj.weight, nor a VQ-KD tokenizer: no "
      f"quantize.embedding.weight (keys: {common.listing(sd)})"
    )
  width = sd["cls_token"].shape[-1]
  patch = sd["patch_embed.proj.weight"].shape[-1]
  depth = 1 + max(
    (int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1
  )
  if depth == 0 or "blocks.0.mlp.fc1.weight" not in sd:
    raise ConfigError(f"{what} has no transformer blocks (blocks.0.mlp.fc1.weight)")
  shared = "rel_pos_bias.relative_position_bias_table" in sd
  per_layer = "blocks.0.attn.relative_position_bias_table" in sd
  num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
  vocab_size = sd["lm_head.weight"].shape[0] if "lm_head.weight" in sd else 0
  if num_classes and vocab_size:
    raise ConfigError(
      f"{what} has both a classification head and a MIM head (lm_head); beit-jax models have one"
    )
  if num_classes and "fc_norm.weight" not in sd:
    raise ConfigError(
      f"{what} classifies from the [CLS] token (head without fc_norm); "
      "beit-jax classifies from fc_norm(mean of the patch tokens)"
    )

  table = sd.get(
    "rel_pos_bias.relative_position_bias_table",
    sd.get("blocks.0.attn.relative_position_bias_table"),
  )
  heads = table.shape[1] if table is not None else None
  if heads is not None and num_heads is not None and heads != num_heads:
    raise ConfigError(
      f"{what}: num_heads={num_heads} but the relative position table has {heads} heads"
    )
  if heads is None and num_heads is None:
    if width not in _HEADS_OF_WIDTH:
      raise ConfigError(
        f"{what}: cannot tell the number of heads of width {width} from "
        "the weights; pass --num_heads"
      )
    logging.warning(
      "%s: no relative position table tells the number of heads; assuming "
      "%d, the standard for width %d (else pass --num_heads)",
      what,
      _HEADS_OF_WIDTH[width],
      width,
    )
  heads = heads or num_heads or _HEADS_OF_WIDTH[width]
  if width % heads:
    raise ConfigError(f"{what}: width {width} is not divisible by num_heads={heads}")

  grid = _infer_grid(sd, what)
  if grid is not None and image_size is not None and grid * patch != image_size:
    raise ConfigError(
      f"{what}: its position parameters are for image size {grid * patch}, not {image_size}"
    )
  image_size = image_size or fallback_image_size
  if grid is None and image_size is None:
    raise ConfigError(
      f"{what} has no position parameters telling its image size; pass --image_size"
    )
  return dict(
    patch_size=patch,
    width=width,
    depth=depth,
    num_heads=heads,
    mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
    image_size=grid * patch if grid is not None else image_size,
    vocab_size=vocab_size,
    num_classes=num_classes,
    use_abs_pos_emb="pos_embed" in sd,
    use_shared_rel_pos_bias=shared,
    use_rel_pos_bias=per_layer,
    # Only whether LayerScale exists matters here: the loaded gammas replace the init.
    layer_scale_init=0.1 if "blocks.0.gamma_1" in sd else 0.0,
  )


def _check_index(key: str, index: np.ndarray, kw: dict[str, Any], what: str) -> None:
  grid = (kw["image_size"] // kw["patch_size"],) * 2
  if not np.array_equal(index, vit.relative_position_index(grid)):
    raise ConfigError(
      f"{what}: {key} is not the relative position index of a {grid[0]}x{grid[1]} patch grid"
    )


def to_params(
  sd: common.StateDict, kw: dict[str, Any], what: str, name: Callable[[str], str] = str
) -> dict[str, np.ndarray]:
  """A unilm-layout state dict -> flat beit-jax params {'blocks_0/attn/qkv/kernel': ...}.

  Every key must be used: stored relative position indices are checked and dropped,
  BEiT v2's `cls_pt_*` decoder is kept when `kw` has `patch_aggregation_layer` and dropped
  (a warning) otherwise, a missing mask token or q/v bias becomes zeros (a warning);
  anything else missing or left over is a ConfigError (the backbone's first).

  Args:
    sd: the state dict (numpy).
    kw: the model fields (`infer_model_kwargs`).
    what: how errors name the source.
    name: maps a unilm key to the source's own name for messages (HF).
  """
  backbone = without_patch_aggregation(kw)
  expected = expected_shapes(kw)
  params = _take(
    sd, rules(backbone), kw, expected, what, name, ignore=lambda k: bool(_V2_DECODER.match(k))
  )
  if kw.get("patch_aggregation_layer"):
    params.update(
      _take(
        sd, decoder_rules(kw), kw, expected, what, name, ignore=lambda k: not _V2_DECODER.match(k)
      )
    )
  else:
    dropped = sorted(k for k in sd if _V2_DECODER.match(k))
    if dropped:
      logging.warning(
        "%s: dropped BEiT v2's patch-aggregation decoder (%d tensors: %s)",
        what,
        len(dropped),
        common.listing(dropped),
      )
  return params


def _take(
  sd: common.StateDict,
  rule_list: list[Rule],
  kw: dict[str, Any],
  expected: dict[str, tuple[int, ...]],
  what: str,
  name: Callable[[str], str],
  ignore: Callable[[str], bool],
) -> dict[str, np.ndarray]:
  """The params of `rule_list`; every key of `sd` but the `ignore`d ones must be used."""
  params, missing, zero_filled = {}, [], []
  for rule in rule_list:
    if rule.key not in sd:
      if _ZERO_IF_ABSENT.match(rule.key):
        params[rule.path] = np.zeros(expected[rule.path], np.float32)
        zero_filled.append(name(rule.key))
      else:
        missing.append(name(rule.key))
      continue
    value = sd[rule.key]
    want = rule.torch_shape(expected[rule.path])
    if tuple(value.shape) != want:
      raise ConfigError(f"{what}: {name(rule.key)} has shape {tuple(value.shape)}, expected {want}")
    params[rule.path] = rule.to_flax(value)
  used = {r.key for r in rule_list}
  for key in sd:
    if _INDEX.match(key) and not ignore(key):
      _check_index(key, sd[key], kw, what)
  unexpected = [name(k) for k in sd if k not in used and not ignore(k) and not _INDEX.match(k)]
  common.check_keys(what, missing=missing, unexpected=unexpected)
  if zero_filled:
    logging.warning(
      "%s: not in the checkpoint, set to zeros: %s", what, common.listing(zero_filled)
    )
  return params


def from_params(params: dict[str, np.ndarray], kw: dict[str, Any]) -> common.StateDict:
  """Flat beit-jax params -> a unilm-layout state dict (numpy, torch layouts)."""
  return {r.key: r.to_torch(params[r.path]) for r in rules(kw)}


def expected_shapes(kw: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """Flat param path -> shape of `VisionTransformer(**kw)`, from the model itself."""
  model = vit.VisionTransformer(**kw)
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, kw["image_size"], kw["image_size"], 3))
  )
  flat = traverse_util.flatten_dict(shapes["params"], sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def load_state_dict(path: str) -> common.StateDict:
  """A unilm `.pth` (a state dict, or one under 'model' / 'module') as numpy."""
  return load_checkpoint(path)[0]


def load_checkpoint(path: str) -> tuple[common.StateDict, dict[str, Any]]:
  """A unilm `.pth` as numpy, and the argparse args unilm saves beside it ({} if none)."""
  what = f"unilm checkpoint {path}"
  obj = common.load_torch(path, what)
  args = obj.get("args") if isinstance(obj, dict) else None
  args = vars(args) if isinstance(args, argparse.Namespace) else {}
  return common.tensors_to_numpy(unwrap(obj, what), what), args
