"""BEiT v2 teacher weights (CLIP, DINO, beit-jax ViTs) -> `models/teachers.py` params.

Sources:
- CLIP: a HuggingFace `CLIPVisionModelWithProjection` or `CLIPModel` save_pretrained
  folder (`vision_model.*` + `visual_projection`; the text tower is ignored), or an
  OpenAI CLIP state dict (`visual.conv1.weight`, ..., `visual.proj`): a `torch.save`
  file, or OpenAI's released TorchScript `.pt` archive.
- DINO: a HuggingFace `ViTModel` folder (facebook/dino-vitb16's layout), or DINO's own
  `.pth` (timm names: `patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, ...).
- beit-jax: a converter's output or a run's workdir (`vit_params.load`).

Each teacher's PyTorch source layout is the hub: HF CLIP is renamed to OpenAI's
(q/k/v fused into `in_proj_weight`), HF ViT to timm's (fused into `attn.qkv`), and
those map onto the modules by renames and transposes. Sizes come from the weights
(heads from config.json, else width / 64 as OpenAI's and DINO's models have).
Results are flat {'resblocks_0/attn/in_proj/kernel': array} params plus the
module's fields.
"""

import math
import re
import zipfile
from typing import Any, Callable

import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from beit_jax.convert import common
from beit_jax.params import vit as vit_params
from beit_jax.convert.unilm import Rule
from beit_jax.errors import ConfigError
from beit_jax.models import teachers

_CONV = (2, 3, 1, 0)  # torch [out, in, kh, kw] -> flax [kh, kw, in, out]
_LINEAR = (1, 0)  # torch [out, in] -> flax [in, out]
_HEAD_DIM = 64  # OpenAI's build_model and DINO's ViTs: heads = width / 64
CLIP_TYPES, VIT_TYPES = ("clip", "clip_vision_model"), ("vit",)

Params = dict[str, np.ndarray]


# ------------------------------------------------------------------ helpers
def _rename(sd: common.StateDict, pairs: list[tuple[re.Pattern, str]]) -> common.StateDict:
  """First matching (pattern, replacement) renames a key; others keep their name."""
  out = {}
  for key, value in sd.items():
    for pattern, repl in pairs:
      if pattern.fullmatch(key):
        key = pattern.sub(repl, key)
        break
    out[key] = value
  return out


def _fuse(sd: common.StateDict, pattern: re.Pattern, fused: str, what: str) -> common.StateDict:
  """Concatenates q, k, v tensors (pattern groups: block, part, suffix) along dim 0."""
  out, groups = {}, {}
  for key, value in sd.items():
    if m := pattern.fullmatch(key):
      groups.setdefault((m["i"], m["p"]), {})[m["qkv"]] = (key, value)
    else:
      out[key] = value
  for (i, p), parts in groups.items():
    names = sorted(parts, key="qkv".index)
    if names != ["q", "k", "v"]:
      absent = [n for n in "qkv" if n not in parts]
      raise ConfigError(
        f"{what}: block {i} has no {'/'.join(absent)} projection {p} "
        f"next to {common.listing(k for k, _ in parts.values())}"
      )
    out[fused.format(i=i, p=p)] = np.concatenate([parts[n][1] for n in "qkv"], axis=0)
  return out


def _depth(sd: common.StateDict, prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  return 1 + max((int(m.group(1)) for k in sd if (m := pattern.match(k))), default=-1)


def _grid_side(tokens: int, what: str, key: str) -> int:
  side = math.isqrt(max(tokens - 1, 0))
  if tokens < 2 or side * side != tokens - 1:
    raise ConfigError(f"{what}: {key} holds {tokens} positions, not [CLS] + a square grid")
  return side


def _heads(width: int, num_heads: int | None, what: str) -> int:
  if num_heads is None:
    if width % _HEAD_DIM:
      raise ConfigError(
        f"{what}: width {width} is not a multiple of {_HEAD_DIM}, so the "
        "number of heads is not width / 64; pass num_heads"
      )
    return width // _HEAD_DIM
  if num_heads < 1 or width % num_heads:
    raise ConfigError(f"{what}: width {width} is not divisible by num_heads={num_heads}")
  return num_heads


def _to_params(
  sd: common.StateDict,
  rules: list[Rule],
  teacher: teachers.Teacher,
  what: str,
  ignore: Callable[[str], bool],
) -> Params:
  """Applies `rules`; every rule's key must exist with its shape, nothing else may remain."""
  shapes = traverse_util.flatten_dict(teacher.param_shapes(), sep="/")
  used = {r.key for r in rules}
  unexpected = [k for k in sd if k not in used and not ignore(k)]
  common.check_keys(what, missing=[r.key for r in rules if r.key not in sd], unexpected=unexpected)
  params = {}
  for rule in rules:
    want = rule.torch_shape(shapes[rule.path].shape)
    if tuple(sd[rule.key].shape) != want:
      raise ConfigError(
        f"{what}: {rule.key} has shape {tuple(sd[rule.key].shape)}, expected {want}"
      )
    params[rule.path] = rule.to_flax(sd[rule.key])
  if set(params) != set(shapes):  # the rules cover the module: a bug if not
    raise AssertionError(f"unmapped teacher params {set(shapes) ^ set(params)}")
  return params


def _linear(path: str, key: str) -> list[Rule]:
  return [Rule(f"{path}/kernel", f"{key}.weight", _LINEAR), Rule(f"{path}/bias", f"{key}.bias")]


def _norm(path: str, key: str) -> list[Rule]:
  return [Rule(f"{path}/scale", f"{key}.weight"), Rule(f"{path}/bias", f"{key}.bias")]


# --------------------------------------------------------------------- CLIP
_V = "visual."
_RB = "visual.transformer.resblocks."


def clip_rules(depth: int) -> list[Rule]:
  """ClipVisionTower param <- OpenAI `visual.*` key."""
  out = [
    Rule("conv1/kernel", f"{_V}conv1.weight", _CONV),
    Rule("class_embedding", f"{_V}class_embedding"),
    Rule("positional_embedding", f"{_V}positional_embedding"),
    *_norm("ln_pre", f"{_V}ln_pre"),
    *_norm("ln_post", f"{_V}ln_post"),
    Rule("proj", f"{_V}proj"),
  ]  # already [width, out]
  for i in range(depth):
    p, k = f"resblocks_{i}", f"{_RB}{i}"
    out += [
      Rule(f"{p}/attn/in_proj/kernel", f"{k}.attn.in_proj_weight", _LINEAR),
      Rule(f"{p}/attn/in_proj/bias", f"{k}.attn.in_proj_bias"),
      *_linear(f"{p}/attn/out_proj", f"{k}.attn.out_proj"),
      *_norm(f"{p}/ln_1", f"{k}.ln_1"),
      *_norm(f"{p}/ln_2", f"{k}.ln_2"),
      *_linear(f"{p}/mlp/c_fc", f"{k}.mlp.c_fc"),
      *_linear(f"{p}/mlp/c_proj", f"{k}.mlp.c_proj"),
    ]
  return out


def clip_params(
  sd: common.StateDict,
  what: str,
  *,
  num_heads: int | None = None,
  layer_norm_eps: float = 1e-5,
  use_quick_gelu: bool = True,
  image_size: int | None = None,
) -> tuple[Params, dict[str, Any]]:
  """An OpenAI-layout CLIP state dict -> (flat ClipVisionTower params, its fields).

  Keys outside `visual.` (the text tower, logit_scale, OpenAI's TorchScript
  `input_resolution` / `context_length` / `vocab_size`) are ignored; a bare
  `model.visual.state_dict()` (no `visual.` prefix) is accepted too.

  Args:
    sd: the state dict (numpy).
    what: how errors name the source.
    num_heads: attention heads; default width / 64 (what OpenAI's models use).
    layer_norm_eps, use_quick_gelu: OpenAI's values by default.
    image_size: if known (a config), checked against the position embedding.
  """
  if not any(k.startswith(_V) for k in sd) and "conv1.weight" in sd:
    sd = {_V + k: v for k, v in sd.items()}
  if f"{_V}conv1.weight" not in sd or f"{_V}positional_embedding" not in sd:
    raise ConfigError(
      f"{what} is not a CLIP image tower: no visual.conv1.weight / "
      f"visual.positional_embedding (keys: {common.listing(sd)})"
    )
  conv = sd[f"{_V}conv1.weight"]
  width, patch = conv.shape[0], conv.shape[-1]
  depth = _depth(sd, _RB)
  if depth == 0 or f"{_RB}0.mlp.c_fc.weight" not in sd or f"{_V}proj" not in sd:
    raise ConfigError(
      f"{what} has no transformer blocks (visual.transformer.resblocks.0"
      ".mlp.c_fc.weight) or no projection (visual.proj)"
    )
  side = _grid_side(sd[f"{_V}positional_embedding"].shape[0], what, "visual.positional_embedding")
  if image_size is not None and side * patch != image_size:
    raise ConfigError(
      f"{what}: image_size={image_size} but the position embedding is for {side * patch}"
    )
  kw = dict(
    patch_size=patch,
    width=width,
    depth=depth,
    num_heads=_heads(width, num_heads, what),
    mlp_dim=sd[f"{_RB}0.mlp.c_fc.weight"].shape[0],
    image_size=side * patch,
    proj_dim=sd[f"{_V}proj"].shape[-1],
    layer_norm_eps=float(layer_norm_eps),
    use_quick_gelu=use_quick_gelu,
  )
  params = _to_params(
    sd, clip_rules(depth), teachers.clip_teacher(**kw), what, ignore=lambda k: not k.startswith(_V)
  )
  return params, kw


_HF_CLIP_RENAMES = [
  (re.compile(a), b)
  for a, b in [
    (r"embeddings\.class_embedding", f"{_V}class_embedding"),
    (r"embeddings\.patch_embedding\.weight", f"{_V}conv1.weight"),
    (r"embeddings\.position_embedding\.weight", f"{_V}positional_embedding"),
    (r"pre_layrnorm\.(weight|bias)", rf"{_V}ln_pre.\1"),
    (r"post_layernorm\.(weight|bias)", rf"{_V}ln_post.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", rf"{_RB}\1.ln_\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", rf"{_RB}\1.attn.out_proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", rf"{_RB}\1.mlp.c_fc.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", rf"{_RB}\1.mlp.c_proj.\2"),
  ]
]
_HF_CLIP_QKV = re.compile(
  r"encoder\.layers\.(?P<i>\d+)\.self_attn\.(?P<qkv>[qkv])_proj\."
  r"(?P<p>weight|bias)"
)
# Not part of the image tower: CLIPModel's text side, an old buffer.
_HF_CLIP_IGNORED = re.compile(
  r"(text_model\.|text_projection\.|logit_scale$|"
  r"embeddings\.position_ids$)"
)


def hf_clip_to_openai(sd: common.StateDict, what: str) -> common.StateDict:
  """HF CLIP vision names (with or without `vision_model.`) -> OpenAI `visual.*` names.

  q/k/v_proj are fused into `attn.in_proj_weight` / `in_proj_bias` (q, k, v order,
  as nn.MultiheadAttention), `visual_projection.weight` [out, width] becomes
  `visual.proj` [width, out]. Text-tower keys are dropped; any other key is a
  ConfigError.
  """
  sd = {
    k.removeprefix("vision_model."): v
    for k, v in sd.items()
    if not _HF_CLIP_IGNORED.match(k.removeprefix("vision_model."))
  }
  proj = sd.pop("visual_projection.weight", None)
  sd = _fuse(_rename(sd, _HF_CLIP_RENAMES), _HF_CLIP_QKV, _RB + "{i}.attn.in_proj_{p}", what)
  common.check_keys(what, unexpected=[k for k in sd if not k.startswith(_V)])
  if proj is not None:
    sd[f"{_V}proj"] = np.ascontiguousarray(proj.T)
  return sd


def load_hf_clip(path: str) -> tuple[Params, dict[str, Any]]:
  """A HF CLIPVisionModelWithProjection / CLIPModel folder -> (params, ClipVisionTower fields)."""
  folder, config, what = common.read_hf_config(path)
  kind = config.get("model_type")
  if kind not in CLIP_TYPES:
    raise ConfigError(f"{what} holds a {kind!r} model, not CLIP ({' or '.join(CLIP_TYPES)})")
  vision = (config.get("vision_config") or {}) if kind == "clip" else config
  sd = common.read_hf_weights(folder, what)
  if "visual_projection.weight" not in sd:
    raise ConfigError(
      f"{what} has no visual_projection.weight (a CLIPVisionModel?); BEiT "
      "v2's target is projected: save the CLIPVisionModelWithProjection or "
      "CLIPModel"
    )
  act = vision.get("hidden_act", "quick_gelu")
  if act not in ("quick_gelu", "gelu"):
    raise ConfigError(f"{what}: hidden_act={act!r}; the CLIP tower runs quick_gelu or gelu")
  image_size = vision.get("image_size")
  return clip_params(
    hf_clip_to_openai(sd, what),
    what,
    num_heads=vision.get("num_attention_heads"),
    layer_norm_eps=vision.get("layer_norm_eps", 1e-5),
    use_quick_gelu=act == "quick_gelu",
    image_size=int(image_size) if image_size else None,
  )


def _is_torchscript(path: str) -> bool:
  try:
    with zipfile.ZipFile(path) as z:
      return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
  except (zipfile.BadZipFile, OSError):
    return False


_WRAPPERS = ("state_dict", "model", "module")


def read_state_dict(
  path: str, what: str, wrappers: tuple[str, ...] = _WRAPPERS
) -> common.StateDict:
  """A torch state dict file, a `.safetensors` file or a TorchScript archive, as numpy.

  A torch file's dict may nest the state dict under one of `wrappers`; a
  TorchScript archive (OpenAI's CLIP release) gives its module's `state_dict()`.
  """
  common.require_file(path, what)
  if path.endswith(".safetensors"):
    return common.load_safetensors(path, what)
  if _is_torchscript(path):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError(
        f"reading {what} needs torch: pip install -r requirements-interop.txt"
      ) from None
    # A TorchScript archive holds TorchScript code and tensors, not Python pickles:
    # loading compiles its methods but calls none (OpenAI's clip.load(jit=False)
    # reads its .pt the same way).
    try:
      tree = torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(
        f"{what} cannot be read as a TorchScript archive ({common.first_line(e)})"
      ) from None
    return common.tensors_to_numpy(dict(tree), what)
  obj = common.load_torch(path, what)
  if isinstance(obj, dict):
    for key in wrappers:
      if isinstance(obj.get(key), dict):
        obj = obj[key]
        break
  if not isinstance(obj, dict):
    raise ConfigError(f"{what} holds a {type(obj).__name__}, not a state dict")
  return common.tensors_to_numpy(obj, what)


def load_openai_clip(path: str, *, num_heads: int | None = None) -> tuple[Params, dict[str, Any]]:
  """An OpenAI CLIP checkpoint (state dict file or TorchScript .pt) -> (params, fields)."""
  what = f"OpenAI CLIP checkpoint {path}"
  return clip_params(read_state_dict(path, what), what, num_heads=num_heads)


# --------------------------------------------------------------------- DINO
def dino_rules(depth: int) -> list[Rule]:
  """DinoViT param <- timm / DINO key."""
  out = [
    Rule("patch_embed/kernel", "patch_embed.proj.weight", _CONV),
    Rule("patch_embed/bias", "patch_embed.proj.bias"),
    Rule("cls_token", "cls_token"),
    Rule("pos_embed", "pos_embed"),
    *_norm("norm", "norm"),
  ]
  for i in range(depth):
    p, k = f"blocks_{i}", f"blocks.{i}"
    out += [
      *_norm(f"{p}/norm1", f"{k}.norm1"),
      *_norm(f"{p}/norm2", f"{k}.norm2"),
      *_linear(f"{p}/attn/qkv", f"{k}.attn.qkv"),
      *_linear(f"{p}/attn/proj", f"{k}.attn.proj"),
      *_linear(f"{p}/mlp/fc1", f"{k}.mlp.fc1"),
      *_linear(f"{p}/mlp/fc2", f"{k}.mlp.fc2"),
    ]
  return out


# DINO's projection head / HF's pooler, classifier, mask token: not the backbone.
_DINO_IGNORED = re.compile(r"(head\.|pooler\.|classifier\.|embeddings\.mask_token$)")


def dino_params(
  sd: common.StateDict,
  what: str,
  *,
  num_heads: int | None = None,
  layer_norm_eps: float = 1e-6,
  image_size: int | None = None,
) -> tuple[Params, dict[str, Any]]:
  """A timm/DINO-layout ViT state dict -> (flat DinoViT params, its fields).

  Args:
    sd: the state dict (numpy); of a `backbone.` (DINO's training wrapper) only
      the backbone is used, a `module.` prefix is dropped.
    what: how errors name the source.
    num_heads: attention heads; default width / 64 (DINO's ViT-S and ViT-B).
    layer_norm_eps: DINO's 1e-6 by default.
    image_size: if known (a config), checked against the position embedding.
  """
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
  if any(k.startswith("backbone.") for k in sd):  # DINO's backbone + projection head
    sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
  if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd or "cls_token" not in sd:
    raise ConfigError(
      f"{what} is not a DINO ViT: no patch_embed.proj.weight / cls_token / "
      f"pos_embed (keys: {common.listing(sd)})"
    )
  if any("relative_position" in k or k.endswith("q_bias") for k in sd):
    raise ConfigError(
      f"{what} is a BEiT ViT (relative position bias / q_bias); use it as a "
      "teacher from a beit-jax checkpoint (python -m beit_jax.convert)"
    )
  width, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
  depth = _depth(sd, "blocks.")
  if depth == 0 or "blocks.0.mlp.fc1.weight" not in sd:
    raise ConfigError(f"{what} has no transformer blocks (blocks.0.mlp.fc1.weight)")
  side = _grid_side(sd["pos_embed"].shape[1], what, "pos_embed")
  if image_size is not None and side * patch != image_size:
    raise ConfigError(
      f"{what}: image_size={image_size} but the position embedding is for {side * patch}"
    )
  kw = dict(
    patch_size=patch,
    width=width,
    depth=depth,
    num_heads=_heads(width, num_heads, what),
    mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
    image_size=side * patch,
    layer_norm_eps=float(layer_norm_eps),
  )
  params = _to_params(
    sd,
    dino_rules(depth),
    teachers.dino_teacher(**kw),
    what,
    ignore=lambda k: bool(_DINO_IGNORED.match(k)),
  )
  return params, kw


_HF_VIT_RENAMES = [
  (re.compile(a), b)
  for a, b in [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    # transformers >= 5 in-memory names (a torch.save(model.state_dict()) file).
    (r"layers\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"layers\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"layers\.(\d+)\.attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"layers\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"blocks.\1.mlp.fc\2.\3"),
  ]
]
_HF_VIT_QKV = [  # saved names, then transformers >= 5 in-memory names
  re.compile(
    r"encoder\.layer\.(?P<i>\d+)\.attention\.attention\.(?P<qkv>[qkv])"
    r"(?:uery|ey|alue)\.(?P<p>weight|bias)"
  ),
  re.compile(r"layers\.(?P<i>\d+)\.attention\.(?P<qkv>[qkv])_proj\.(?P<p>weight|bias)"),
]


def hf_vit_to_timm(sd: common.StateDict, what: str) -> common.StateDict:
  """HF ViTModel names (with or without `vit.`) -> timm/DINO names, q/k/v fused into qkv."""
  beit = [k for k in sd if k.startswith("beit.") or "lambda_" in k or "relative_position" in k]
  if beit:
    raise ConfigError(f"{what} holds BEiT weights ({common.listing(beit)}), not a DINO ViT")
  sd = _rename({k.removeprefix("vit."): v for k, v in sd.items()}, _HF_VIT_RENAMES)
  for pattern in _HF_VIT_QKV:
    sd = _fuse(sd, pattern, "blocks.{i}.attn.qkv.{p}", what)
  return sd


def load_hf_dino(path: str) -> tuple[Params, dict[str, Any]]:
  """A HF ViTModel folder (DINO, e.g. facebook/dino-vitb16) -> (params, DinoViT fields)."""
  folder, config, what = common.read_hf_config(path)
  if config.get("model_type") not in VIT_TYPES:
    raise ConfigError(f"{what} holds a {config.get('model_type')!r} model, not a DINO ViT ('vit')")
  if config.get("hidden_act", "gelu") != "gelu":
    raise ConfigError(
      f"{what}: hidden_act={config['hidden_act']!r}; the DINO ViT uses exact GELU ('gelu')"
    )
  if config.get("num_channels", 3) != 3:
    raise ConfigError(f"{what}: num_channels={config['num_channels']}; teachers take RGB")
  sd = hf_vit_to_timm(common.read_hf_weights(folder, what), what)
  image_size = config.get("image_size")
  if isinstance(image_size, (list, tuple)):
    image_size = image_size[0] if len(set(image_size)) == 1 else -1
  dropped = sorted(k for k in sd if _DINO_IGNORED.match(k))
  if dropped:
    logging.info("%s: not part of the teacher, ignored: %s", what, common.listing(dropped))
  return dino_params(
    sd,
    what,
    num_heads=config.get("num_attention_heads"),
    layer_norm_eps=config.get("layer_norm_eps", 1e-12),
    image_size=int(image_size) if image_size else None,
  )


def load_dino(path: str, *, num_heads: int | None = None) -> tuple[Params, dict[str, Any]]:
  """DINO's own checkpoint (e.g. dino_vitbase16_pretrain.pth) -> (params, DinoViT fields)."""
  what = f"DINO checkpoint {path}"
  return dino_params(
    read_state_dict(path, what, wrappers=("teacher",) + _WRAPPERS), what, num_heads=num_heads
  )


# ---------------------------------------------------------------- any teacher
def load_teacher(
  path: str, *, num_heads: int | None = None, block: int | None = None
) -> tuple[teachers.Teacher, dict[str, Any]]:
  """Any supported teacher checkpoint -> (Teacher, nested params for `features`).

  A folder with a HF config.json is read by its model_type (clip,
  clip_vision_model: CLIP; vit: DINO); another folder as a beit-jax checkpoint
  (then `block` picks the block, see `teachers.vit_teacher`); a file as an
  OpenAI CLIP or DINO state dict, told apart by its keys.
  """
  p = epath.Path(path)
  if p.is_dir():
    config = {}
    if (p / "config.json").is_file():
      _, config, _ = common.read_hf_config(path)
    kind = config.get("model_type")
    if kind in CLIP_TYPES:
      params, kw = load_hf_clip(path)
      return teachers.clip_teacher(**kw), vit_params.nested(params)
    if kind in VIT_TYPES:
      params, kw = load_hf_dino(path)
      return teachers.dino_teacher(**kw), vit_params.nested(params)
    if kind is not None:
      raise ConfigError(
        f"teacher {path} is a HF {kind!r} folder; teachers are CLIP "
        f"({', '.join(CLIP_TYPES)}), DINO ViT (vit) or beit-jax checkpoints "
        "(convert BEiT ones with python -m beit_jax.convert first)"
      )
    try:
      params, kw = vit_params.load(path, num_heads=num_heads)
    except ConfigError as e:
      raise ConfigError(
        f"teacher {path} is neither a HF folder (no config.json) nor a beit-jax checkpoint: {e}"
      ) from None
    if block is not None and not -kw["depth"] <= block < kw["depth"]:
      raise ConfigError(
        f"teacher block={block} must index the {kw['depth']} blocks of "
        f"{path}: {-kw['depth']}..{kw['depth'] - 1}"
      )
    return teachers.vit_teacher(kw, block), vit_params.nested(params)
  what = f"teacher checkpoint {path}"
  sd = read_state_dict(path, what)
  if any(k.endswith("conv1.weight") for k in sd):
    params, kw = clip_params(sd, what, num_heads=num_heads)
    return teachers.clip_teacher(**kw), vit_params.nested(params)
  if any(k.endswith("patch_embed.proj.weight") for k in sd):
    params, kw = dino_params(sd, what, num_heads=num_heads)
    return teachers.dino_teacher(**kw), vit_params.nested(params)
  raise ConfigError(
    f"{what} is neither an OpenAI CLIP (visual.conv1.weight) nor a DINO "
    f"(patch_embed.proj.weight) state dict (keys: {common.listing(sd)})"
  )
