"""HuggingFace transformers BEiT `save_pretrained` folders <-> beit-jax ViT params.

Both directions go through the unilm layout (`unilm.py`): HF names are renamed to
unilm's and q/k/v are fused into `qkv`. Folders hold `config.json` and the weights
as safetensors (read and written with the safetensors numpy API, no torch) or
`pytorch_model.bin` (read with torch); sharded weights (`*.index.json`) too.

Key names: `save_pretrained` writes the long-standing names
(`beit.encoder.layer.0.attention.attention.query.weight`) in transformers 4 and 5;
transformers 5 uses shorter ones in memory (`beit.layers.0.attention.q_proj.weight`),
which a `torch.save(model.state_dict())` file has. Both are read; the former is written.
"""

import functools
import json
import re
from typing import Any

import numpy as np
from absl import logging

from beit_jax.convert import common
from beit_jax.convert import unilm
from beit_jax.errors import ConfigError

MIM, CLASSIFICATION, BASE = (
  "BeitForMaskedImageModeling",
  "BeitForImageClassification",
  "BeitModel",
)
_LN_EPS = 1e-6  # beit-jax's (unilm's); HF's BEiT default is 1e-12

# transformers >= 5 in-memory names -> saved names (first match wins).
_RENAMED_IN_V5 = [
  (re.compile(a), b)
  for a, b in [
    (
      r"^beit\.layers\.(\d+)\.relative_position_bias\.",
      r"beit.encoder.layer.\1.attention.attention.relative_position_bias.",
    ),
    (
      r"^beit\.layers\.(\d+)\.attention\.q_proj\.",
      r"beit.encoder.layer.\1.attention.attention.query.",
    ),
    (
      r"^beit\.layers\.(\d+)\.attention\.k_proj\.",
      r"beit.encoder.layer.\1.attention.attention.key.",
    ),
    (
      r"^beit\.layers\.(\d+)\.attention\.v_proj\.",
      r"beit.encoder.layer.\1.attention.attention.value.",
    ),
    (
      r"^beit\.layers\.(\d+)\.attention\.o_proj\.",
      r"beit.encoder.layer.\1.attention.output.dense.",
    ),
    (r"^beit\.layers\.(\d+)\.mlp\.fc1\.", r"beit.encoder.layer.\1.intermediate.dense."),
    (r"^beit\.layers\.(\d+)\.mlp\.fc2\.", r"beit.encoder.layer.\1.output.dense."),
    (r"^beit\.layers\.(\d+)\.", r"beit.encoder.layer.\1."),
    (r"^beit\.shared_position_bias\.", "beit.encoder.relative_position_bias."),
  ]
]

# (HF name, unilm name); {i} block, {p} weight|bias, {t} table|index, {n} 1|2.
_PAIRS = [
  ("beit.embeddings.cls_token", "cls_token"),
  ("beit.embeddings.mask_token", "mask_token"),
  ("beit.embeddings.position_embeddings", "pos_embed"),
  ("beit.embeddings.patch_embeddings.projection.{p}", "patch_embed.proj.{p}"),
  ("beit.encoder.relative_position_bias.{t}", "rel_pos_bias.{t}"),
  ("beit.encoder.layer.{i}.layernorm_before.{p}", "blocks.{i}.norm1.{p}"),
  ("beit.encoder.layer.{i}.layernorm_after.{p}", "blocks.{i}.norm2.{p}"),
  ("beit.encoder.layer.{i}.attention.attention.query.bias", "blocks.{i}.attn.q_bias"),
  ("beit.encoder.layer.{i}.attention.attention.value.bias", "blocks.{i}.attn.v_bias"),
  ("beit.encoder.layer.{i}.attention.attention.relative_position_bias.{t}", "blocks.{i}.attn.{t}"),
  ("beit.encoder.layer.{i}.attention.output.dense.{p}", "blocks.{i}.attn.proj.{p}"),
  ("beit.encoder.layer.{i}.intermediate.dense.{p}", "blocks.{i}.mlp.fc1.{p}"),
  ("beit.encoder.layer.{i}.output.dense.{p}", "blocks.{i}.mlp.fc2.{p}"),
  ("beit.encoder.layer.{i}.lambda_{n}", "blocks.{i}.gamma_{n}"),
  ("beit.pooler.layernorm.{p}", "fc_norm.{p}"),
  ("classifier.{p}", "head.{p}"),
  ("lm_head.{p}", "lm_head.{p}"),
]
# The final LayerNorm: BeitForMaskedImageModeling's own, else BeitModel's.
_MIM_NORM, _MODEL_NORM = ("layernorm.{p}", "norm.{p}"), ("beit.layernorm.{p}", "norm.{p}")
_QKV = ("beit.encoder.layer.{i}.attention.attention.{qkv}.weight", "blocks.{i}.attn.qkv.weight")
_FIELDS = {
  "i": r"\d+",
  "p": "weight|bias",
  "n": "1|2",
  "qkv": "query|key|value",
  "t": "relative_position_bias_table|relative_position_index",
}


@functools.cache
def _regex(template: str) -> re.Pattern:
  pattern = re.escape(template)
  for field, alternatives in _FIELDS.items():
    pattern = pattern.replace(re.escape(f"{{{field}}}"), f"(?P<{field}>{alternatives})")
  return re.compile(pattern)


def _translate(key: str, pairs, src: int) -> str | None:
  """`key` matched against side `src` of `pairs`, formatted as the other side."""
  for pair in pairs:
    m = _regex(pair[src]).fullmatch(key)
    if m:
      return pair[1 - src].format(**m.groupdict())
  return None


def hf_name(key: str, arch: str = MIM) -> str:
  """The HF name of a unilm key (messages, export); the fused qkv names all three."""
  if m := _regex(_QKV[1]).fullmatch(key):
    return _QKV[0].format(i=m["i"], qkv="{query,key,value}")
  norm = _MIM_NORM if arch == MIM else _MODEL_NORM
  return _translate(key, _PAIRS + [norm], 1) or key


def to_unilm(sd: common.StateDict, what: str) -> tuple[common.StateDict, str]:
  """HF names -> unilm names, q/k/v fused. Returns the state dict and the HF class.

  Keys that match nothing keep their HF name, so the unilm stage reports them as
  unexpected under the name the user knows.
  """
  if not any(k.startswith("beit.") for k in sd):  # a BeitModel's own keys
    sd = {f"beit.{k}": v for k, v in sd.items()}
  renamed = {}
  for key, value in sd.items():
    for pattern, repl in _RENAMED_IN_V5:
      if pattern.match(key):
        key = pattern.sub(repl, key)
        break
    renamed[key] = value
  arch = (
    MIM
    if "lm_head.weight" in renamed
    else CLASSIFICATION
    if "classifier.weight" in renamed
    else BASE
  )
  if "layernorm.weight" in renamed and "beit.layernorm.weight" in renamed:
    raise ConfigError(
      f"{what} applies two final LayerNorms (beit.layernorm and "
      "layernorm: use_mean_pooling=False with a MIM head); beit-jax has one"
    )
  if arch == BASE and "beit.pooler.layernorm.weight" in renamed:
    raise ConfigError(
      f"{what} is a BeitModel with use_mean_pooling=True: it has no final "
      "LayerNorm for a headless beit-jax model; convert the "
      "BeitForImageClassification it came from"
    )
  out, qkv = {}, {}
  for key, value in renamed.items():
    if m := _regex(_QKV[0]).fullmatch(key):
      qkv.setdefault(int(m["i"]), {})[m["qkv"]] = (key, value)
      continue
    out[_translate(key, _PAIRS + [_MIM_NORM, _MODEL_NORM], 0) or key] = value
  for i, parts in qkv.items():
    if len(parts) == 3:
      out[_QKV[1].format(i=i)] = np.concatenate(
        [parts[n][1] for n in ("query", "key", "value")], axis=0
      )
    else:  # the missing ones are reported under the fused key's HF name
      out.update({key: value for key, value in parts.values()})
  return out, arch


def _square(value: Any, field: str, what: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ConfigError(
        f"{what}: config {field}={value} is not square; beit-jax needs square images and patches"
      )
    value = value[0]
  return int(value)


def read_folder(path: str) -> tuple[common.StateDict, dict[str, Any]]:
  """The weights and config.json of a `save_pretrained` folder."""
  folder, config, what = common.read_hf_config(path)
  if config.get("model_type") != "beit":
    raise ConfigError(f"{what} holds a {config.get('model_type')!r} model, not 'beit'")
  return common.read_hf_weights(folder, what), config


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A HF BEiT folder -> (flat beit-jax params, model fields)."""
  what = f"HF folder {path}"
  sd_hf, config = read_folder(path)
  if config.get("hidden_act", "gelu") != "gelu":
    raise ConfigError(
      f"{what}: hidden_act={config['hidden_act']!r}; beit-jax uses exact GELU ('gelu')"
    )
  if config.get("num_channels", 3) != 3:
    raise ConfigError(f"{what}: num_channels={config['num_channels']}; beit-jax takes RGB")
  eps = config.get("layer_norm_eps", 1e-12)
  if eps != _LN_EPS:
    logging.warning(
      "%s: layer_norm_eps=%g but beit-jax uses %g (unilm's); outputs "
      "differ slightly from this HF model's",
      what,
      eps,
      _LN_EPS,
    )
  sd, arch = to_unilm(sd_hf, what)
  patch = _square(config.get("patch_size", 16), "patch_size", what)
  if "patch_embed.proj.weight" in sd and sd["patch_embed.proj.weight"].shape[-1] != patch:
    raise ConfigError(
      f"{what}: config patch_size={patch} but the patch embedding is "
      f"{sd['patch_embed.proj.weight'].shape[-1]} wide"
    )
  kw = unilm.infer_model_kwargs(
    sd,
    what,
    num_heads=config.get("num_attention_heads"),
    image_size=_square(config.get("image_size", 224), "image_size", what),
  )
  return unilm.to_params(sd, kw, what, name=lambda k: hf_name(k, arch)), kw


def config_json(kw: dict[str, Any]) -> dict[str, Any]:
  """The BeitConfig fields of a model with fields `kw` (unset ones keep HF defaults)."""
  arch = MIM if kw["vocab_size"] else CLASSIFICATION if kw["num_classes"] else BASE
  config = {
    "architectures": [arch],
    "model_type": "beit",
    "hidden_size": kw["width"],
    "num_hidden_layers": kw["depth"],
    "num_attention_heads": kw["num_heads"],
    "intermediate_size": kw["mlp_dim"],
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "layer_norm_eps": _LN_EPS,
    "image_size": kw["image_size"],
    "patch_size": kw["patch_size"],
    "num_channels": 3,
    "use_mask_token": True,
    "use_absolute_position_embeddings": kw["use_abs_pos_emb"],
    "use_relative_position_bias": kw["use_rel_pos_bias"],
    "use_shared_relative_position_bias": kw["use_shared_rel_pos_bias"],
    "layer_scale_init_value": kw["layer_scale_init"],
    # Mean pooling makes BeitModel's own final norm an identity: the MIM head's
    # `layernorm` (= beit-jax `norm`) and the pooler's (= `fc_norm`) are the only ones.
    "use_mean_pooling": arch != BASE,
    "vocab_size": kw["vocab_size"] or 8192,
  }
  if kw["num_classes"]:
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(kw["num_classes"])}
    config["label2id"] = {f"LABEL_{i}": i for i in range(kw["num_classes"])}
  return config


def save_pretrained(path: str, params: dict[str, np.ndarray], kw: dict[str, Any]) -> str:
  """Writes `config.json` + `model.safetensors` that `Beit*.from_pretrained` loads.

  Returns:
    the transformers class to load it with.
  """
  try:
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError("writing a HF folder needs the safetensors package") from None
  config = config_json(kw)
  arch = config["architectures"][0]
  sd = {}
  for key, value in unilm.from_params(params, kw).items():
    if m := _regex(_QKV[1]).fullmatch(key):
      for name, part in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
        sd[_QKV[0].format(i=m["i"], qkv=name)] = np.ascontiguousarray(part)
    else:
      sd[hf_name(key, arch)] = value
  if arch == BASE:  # BeitModel's own names have no prefix
    sd = {k.removeprefix("beit."): v for k, v in sd.items()}
  folder = common.ensure_new_dir(path, "output folder")
  (folder / "config.json").write_text(json.dumps(config, indent=2))
  save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
  return arch
