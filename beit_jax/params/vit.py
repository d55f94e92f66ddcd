"""A ViT's params from a beit-jax checkpoint, adapted to another ViT: the model fields
inferred from the weights (and config.json), the relative position bias shared or
per-layer, the position tables resized for another image size.

Params here are flat {'blocks_0/attn/qkv/kernel': array} dicts with the model fields
`kw` of `unilm.infer_model_kwargs` next to them. Used by `params.load_into(..., vit=Fit(...))`
(fine-tuning, probing, segmentation), the converters and `beit_jax.load`.
"""

import dataclasses
import json
import re
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from beit_jax.convert import common
from beit_jax.convert import relpos
from beit_jax.convert import unilm
from beit_jax.errors import ConfigError
from beit_jax.models import vit
from beit_jax.params.read import read as read_params

REL_POS_CHOICES = ("keep", "shared", "per_layer")
_SHARED = "rel_pos_bias/relative_position_bias_table"
_TABLE = "{}/attn/relative_position_bias_table"
_DECODER_BLOCK = re.compile(r"cls_pt_layers_(\d+)/")


def _grid(kw: dict[str, Any]) -> tuple[int, int]:
  side = kw["image_size"] // kw["patch_size"]
  return side, side


def resize(
  params: dict[str, np.ndarray], kw: dict[str, Any], image_size: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Position parameters for `image_size` (relative tables and absolute embedding)."""
  if image_size <= 0 or image_size % kw["patch_size"]:
    raise ConfigError(
      f"image_size={image_size} must be a positive multiple of the patch size {kw['patch_size']}"
    )
  new_kw = dict(kw, image_size=image_size)
  src, dst = _grid(kw), _grid(new_kw)
  if src == dst:
    return params, kw
  out = dict(params)
  for path, value in params.items():
    if path.endswith("relative_position_bias_table"):
      out[path] = relpos.resize_rel_pos_table(value, src, dst)
    elif path == "pos_embed":
      out[path] = relpos.resize_abs_pos_embed(value, src, dst)
  return out, new_kw


def set_rel_pos(
  params: dict[str, np.ndarray], kw: dict[str, Any], mode: str
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Shared <-> per-layer relative position bias.

  'per_layer' copies the shared table into every block (what unilm's fine-tuning
  does); 'shared' needs all blocks' tables to be equal (one table then computes
  the same function), which holds for such copies but not after fine-tuning.
  """
  if mode not in REL_POS_CHOICES:
    raise ConfigError(f"--rel_pos={mode!r} is not accepted; use one of {REL_POS_CHOICES}")
  # The backbone's blocks, then v2's patch-aggregation decoder (which uses the same bias).
  blocks = [f"blocks_{i}" for i in range(kw["depth"])] + [
    f"cls_pt_layers_{j}"
    for j in range(kw.get("patch_aggregation_depth", 0) if kw.get("patch_aggregation_layer") else 0)
  ]
  out = dict(params)
  if mode == "per_layer" and kw["use_shared_rel_pos_bias"]:
    shared = out.pop(_SHARED)
    for block in blocks:
      key = _TABLE.format(block)
      out[key] = shared + out[key] if key in out else shared.copy()
    return out, dict(kw, use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
  if mode == "shared" and kw["use_rel_pos_bias"]:
    tables = [out.pop(_TABLE.format(block)) for block in blocks]
    differ = [
      blocks[i].removeprefix("blocks_")
      for i, t in enumerate(tables)
      if not np.array_equal(t, tables[0])
    ]
    if differ:
      raise ConfigError(
        f"--rel_pos=shared: blocks {common.listing(map(str, differ))} have "
        "relative position tables that differ from block 0's; one shared "
        "table cannot reproduce them"
      )
    out[_SHARED] = tables[0] + out[_SHARED] if _SHARED in out else tables[0]
    return out, dict(kw, use_shared_rel_pos_bias=True, use_rel_pos_bias=False)
  return out, kw


def adapt(
  params: dict[str, np.ndarray],
  kw: dict[str, Any],
  *,
  rel_pos: str = "keep",
  image_size: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """`resize` (if `image_size`) then `set_rel_pos`."""
  if image_size is not None:
    params, kw = resize(params, kw, image_size)
  return set_rel_pos(params, kw, rel_pos)


@dataclasses.dataclass(frozen=True)
class Fit:
  """The ViT a checkpoint's ViT params are fitted to (`params.load_into(..., vit=)`).

  image_size: the position tables are resized to it.
  rel_pos: the relative position bias made 'per_layer' or 'shared', or kept as saved.
  num_heads: the model's, when neither the weights nor the checkpoint's config.json tell.
  """

  image_size: int
  rel_pos: str = "keep"
  num_heads: int | None = None

  @classmethod
  def of(cls, config: ml_collections.ConfigDict) -> "Fit":
    """The ViT of `config.model` on `config.input` (fine-tuning, probing, segmentation)."""
    m = config.model
    return cls(
      image_size=config.input.image_size,
      rel_pos=(
        "per_layer" if m.use_rel_pos_bias else "shared" if m.use_shared_rel_pos_bias else "keep"
      ),
      num_heads=vit.size_kwargs(m)["num_heads"],
    )


def fit(
  params: dict[str, np.ndarray], path: str, what: str, to: Fit
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Flat ViT params of the checkpoint at `path`, adapted `to` a ViT; and the model fields
  of the checkpoint (for `config_flags` in errors)."""
  config_file = epath.Path(path) / "config.json"
  saved = json.loads(config_file.read_text()) if config_file.exists() else None
  source = infer_model_kwargs(
    params, what, config=saved, num_heads=to.num_heads, fallback_image_size=to.image_size
  )
  params, kw = adapt(params, source, rel_pos=to.rel_pos, image_size=to.image_size)
  if kw["image_size"] != source["image_size"]:
    logging.info(
      "%s: position parameters resized from %d to %d pixels",
      what,
      source["image_size"],
      kw["image_size"],
    )
  return params, source


def check(params: dict[str, np.ndarray], kw: dict[str, Any], what: str) -> None:
  """Params are exactly those of `VisionTransformer(**kw)`: keys and shapes."""
  expected = unilm.expected_shapes(kw)
  common.check_keys(
    what, missing=expected.keys() - params.keys(), unexpected=params.keys() - expected.keys()
  )
  for path, shape in sorted(expected.items()):
    if tuple(params[path].shape) != shape:
      raise ConfigError(f"{what}: {path} has shape {tuple(params[path].shape)}, expected {shape}")


def flat(params: Any) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def read(path: str) -> dict[str, np.ndarray]:
  """The flat ViT params of a beit-jax checkpoint."""
  return flat(read_params(path))


def nested(params: dict[str, np.ndarray]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(params, sep="/")


def _kwargs_from_config(config: dict[str, Any], what: str) -> dict[str, Any] | None:
  """Model fields of a converter's config.json ('vit') or a run's ('model', 'input')."""
  if "vit" in config:
    return dict(config["vit"])
  model, inp = config.get("model"), config.get("input")
  if not (isinstance(model, dict) and isinstance(inp, dict) and "variant" in model):
    return None
  try:
    sizes = vit.variant_kwargs(
      model["variant"], **{k: model.get(k) for k in ("width", "depth", "num_heads", "mlp_dim")}
    )
  except ValueError as e:  # a bad variant
    raise ConfigError(f"{what}: model.variant: {e}") from None
  return dict(sizes, image_size=inp.get("image_size"))


def infer_model_kwargs(
  params: dict[str, np.ndarray],
  what: str,
  *,
  config: dict[str, Any] | None = None,
  num_heads: int | None = None,
  fallback_image_size: int | None = None,
  patch_aggregation_layer: int | None = None,
) -> dict[str, Any]:
  """Model fields of beit-jax ViT params; heads / image size from `config` if needed.

  `num_heads`, `fallback_image_size` and `patch_aggregation_layer` (v2's decoder) serve
  when neither the weights nor `config` tell them (see `unilm.infer_model_kwargs` and
  `unilm.patch_aggregation_kwargs`).
  """
  if "cls_token" not in params or "patch_embed/kernel" not in params:
    raise ConfigError(
      f"{what} holds no BEiT ViT params (no cls_token / patch_embed; "
      f"keys: {common.listing(params)})"
    )
  known = _kwargs_from_config(config or {}, what) or {}
  # unilm's inference reads the shapes of the same tensors in torch's shapes (here
  # zero-strided stand-ins: no copy).
  sd = {
    r.key: np.broadcast_to(np.float32(0), r.torch_shape(params[r.path].shape))
    for r in unilm.rules(_present_fields(params))
    if r.path in params
  }
  kw = unilm.infer_model_kwargs(
    sd,
    what,
    num_heads=known.get("num_heads") or num_heads,
    image_size=known.get("image_size"),
    fallback_image_size=fallback_image_size,
  )
  decoder = {int(m.group(1)) for k in params if (m := _DECODER_BLOCK.match(k))}
  if decoder:  # BEiT v2's patch aggregation: which block it reads is in the config only
    fake = {f"cls_pt_layers.{j}.norm1.weight": None for j in decoder}
    kw.update(
      unilm.patch_aggregation_kwargs(
        fake,
        kw,
        what,
        layer=_patch_aggregation_layer(config or {}) or patch_aggregation_layer,
        checkpoint_args={"head_layers": len(decoder)},
      )
    )
  return kw


def _patch_aggregation_layer(config: dict[str, Any]) -> int | None:
  """The aggregated layer a converter's config.json ('vit') or a run's ('model') records."""
  if isinstance(config.get("vit"), dict):
    return config["vit"].get("patch_aggregation_layer")
  pa = (
    (config.get("model") or {}).get("patch_aggregation")
    if isinstance(config.get("model"), dict)
    else None
  )
  return pa.get("layer") if isinstance(pa, dict) else None


def _present_fields(params: dict[str, np.ndarray]) -> dict[str, Any]:
  """Fields broad enough that `unilm.rules` lists every param that exists."""
  depth = 1 + max(
    (int(m.group(1)) for k in params if (m := re.match(r"blocks_(\d+)/", k))), default=-1
  )
  return dict(
    depth=depth,
    use_abs_pos_emb=True,
    use_shared_rel_pos_bias=True,
    use_rel_pos_bias=True,
    layer_scale_init=1.0,
    num_classes=1 if "head/kernel" in params else 0,
    vocab_size=1 if "lm_head/kernel" in params else 0,
  )


def load(
  path: str,
  *,
  num_heads: int | None = None,
  fallback_image_size: int | None = None,
  patch_aggregation_layer: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A beit-jax checkpoint (a converter's output or a run's workdir) and its fields."""
  what = f"beit-jax checkpoint {path}"
  params = read(path)
  config_file = epath.Path(path) / "config.json"
  config = json.loads(config_file.read_text()) if config_file.exists() else None
  kw = infer_model_kwargs(
    params,
    what,
    config=config,
    num_heads=num_heads,
    fallback_image_size=fallback_image_size,
    patch_aggregation_layer=patch_aggregation_layer,
  )
  check(params, kw, what)
  return params, kw


def save(path: str, params: dict[str, np.ndarray], kw: dict[str, Any], source: str) -> None:
  """A beit-jax checkpoint `config.init_from` starts from, with the fields in config.json."""
  # Here, not at the top: `checkpoint` imports `params.blocks`, whose package imports this.
  from beit_jax.training import checkpoint  # pylint: disable=g-import-not-at-top

  common.ensure_new_dir(path, "output folder")
  checkpoint.save_params(path, nested(params), {"converted_from": source, "vit": kw})


def config_flags(kw: dict[str, Any]) -> str:
  """The `--config.*` overrides of a MIM run whose model these params fit."""
  sizes = {k: kw[k] for k in ("width", "depth", "num_heads", "mlp_dim")}
  standard = [
    name.split("/")[0]
    for name in vit.VARIANTS
    if all(vit.variant_kwargs(name)[k] == v for k, v in sizes.items())
  ]
  flags = {"model.variant": f"{(standard or ['B'])[0]}/{kw['patch_size']}"}
  if not standard:
    flags.update({f"model.{k}": v for k, v in sizes.items()})
  flags.update(
    {
      "input.image_size": kw["image_size"],
      "input.patch_size": kw["patch_size"],
      "model.use_abs_pos_emb": kw["use_abs_pos_emb"],
      "model.use_shared_rel_pos_bias": kw["use_shared_rel_pos_bias"],
      "model.layer_scale_init": kw["layer_scale_init"],
    }
  )
  if kw["vocab_size"]:
    flags["tokenizer.vocab_size"] = kw["vocab_size"]
  if kw.get("patch_aggregation_layer"):  # configs/beitv2_*.py have these fields
    flags["model.patch_aggregation.layer"] = kw["patch_aggregation_layer"]
    flags["model.patch_aggregation.depth"] = kw["patch_aggregation_depth"]
  return " ".join(f"--config.{k}={v}" for k, v in flags.items())
