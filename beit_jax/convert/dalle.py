"""OpenAI DALL-E `encoder.pkl` / `decoder.pkl` -> beit-jax `DiscreteVAE` params.

The files are whole pickled modules of the `dall_e` package. They are read with
`torch.load(weights_only=True)`, the `dall_e` and `torch.nn` module classes standing
in as state-only objects, so neither `dall_e` needs to be installed nor any code in
the pickle runs. A plain `state_dict()` of those modules is read too.

torch `blocks.<path>.w` [out, in, k, k] -> flax `blocks/<path>/w` [k, k, in, out];
`.b` as is (see `beit_jax/models/dvae.py`).
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from beit_jax.training import checkpoint
from beit_jax.convert import common
from beit_jax.params import vit as vit_params
from beit_jax.errors import ConfigError
from beit_jax.models import dvae

ENCODER, DECODER = "dall_e.encoder.Encoder", "dall_e.decoder.Decoder"
_MODULE_CLASSES = (
  ENCODER,
  "dall_e.encoder.EncoderBlock",
  DECODER,
  "dall_e.decoder.DecoderBlock",
  "dall_e.utils.Conv2d",
  "torch.nn.modules.container.Sequential",
  "torch.nn.modules.activation.ReLU",
  "torch.nn.modules.pooling.MaxPool2d",
  "torch.nn.modules.upsampling.Upsample",
  "torch.nn.modules.linear.Identity",
)
_KEY = re.compile(r"blocks\.((?:[a-z0-9_]+\.)*)([wb])")


def load_pickle(path: str) -> tuple[str, common.StateDict]:
  """('encoder' | 'decoder', numpy state dict) of a DALL-E pickle or state dict."""
  what = f"DALL-E file {path}"
  obj = common.load_torch(path, what, _MODULE_CLASSES)
  if isinstance(obj, common.PickledModule):
    if obj.pickled_name not in (ENCODER, DECODER):
      raise ConfigError(f"{what} holds a {obj.pickled_name}, not a DALL-E Encoder or Decoder")
    group_count = obj.__dict__.get("group_count", dvae.NUM_GROUPS)
    if group_count != dvae.NUM_GROUPS:
      raise ConfigError(f"{what}: group_count={group_count}; beit-jax's dVAE has {dvae.NUM_GROUPS}")
    sd = obj.state_dict()
  elif isinstance(obj, dict):
    sd = obj
  else:
    raise ConfigError(f"{what} holds a {type(obj).__name__}, not a DALL-E module")
  if "blocks.input.w" not in sd:
    raise ConfigError(
      f"{what} is not a DALL-E encoder/decoder: no blocks.input.w (keys: {common.listing(sd)})"
    )
  sd = common.tensors_to_numpy(sd, what)
  # The encoder's stem is a 7x7 conv on pixels, the decoder's a 1x1 conv on codes.
  return ("encoder" if sd["blocks.input.w"].shape[-1] == 7 else "decoder"), sd


def _blocks_per_group(sd: common.StateDict) -> int:
  return len({m.group(1) for k in sd if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))})


def _need(sd: common.StateDict, key: str, what: str) -> np.ndarray:
  if key not in sd:
    raise ConfigError(f"{what}: missing key {key}")
  return sd[key]


def encoder_fields(sd: common.StateDict, what: str) -> dict[str, int]:
  stem = _need(sd, "blocks.input.w", what)  # [n_hid, 3, 7, 7]
  if stem.shape[1] != 3:
    raise ConfigError(f"{what}: the encoder takes {stem.shape[1]} channels, not RGB")
  return dict(
    n_hid=stem.shape[0],
    n_blk_per_group=_blocks_per_group(sd),
    vocab_size=_need(sd, "blocks.output.conv.w", what).shape[0],
  )


def decoder_fields(sd: common.StateDict, what: str) -> dict[str, int]:
  stem = _need(sd, "blocks.input.w", what)  # [n_init, vocab, 1, 1]
  out = _need(sd, "blocks.output.conv.w", what)  # [6, n_hid, 1, 1]
  if out.shape[0] != 6:
    raise ConfigError(
      f"{what}: the decoder has {out.shape[0]} output channels, not 6 (RGB location and log-scale)"
    )
  return dict(
    n_init=stem.shape[0],
    vocab_size=stem.shape[1],
    n_hid=out.shape[1],
    n_blk_per_group=_blocks_per_group(sd),
  )


def _expected(module, x) -> dict[str, tuple[int, ...]]:
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def to_params(sd: common.StateDict, module, x, what: str) -> dict[str, Any]:
  """A torch state dict -> the flax params of `module` (checked against its init)."""
  expected = _expected(module, x)
  flat, unexpected = {}, []
  for key, value in sd.items():
    m = _KEY.fullmatch(key)
    if not m:
      unexpected.append(key)
      continue
    path = "blocks/" + m.group(1).replace(".", "/") + m.group(2)
    flat[path] = np.transpose(value, (2, 3, 1, 0)) if m.group(2) == "w" else value
  back = lambda p: p.replace("/", ".")  # flax path -> torch key
  common.check_keys(
    what,
    missing=[back(p) for p in expected.keys() - flat.keys()],
    unexpected=unexpected + [back(p) for p in flat.keys() - expected.keys()],
  )
  for path, shape in sorted(expected.items()):
    if flat[path].shape != shape:
      want = (shape[3], shape[2], shape[0], shape[1]) if path.endswith("/w") else shape
      raise ConfigError(
        f"{what}: {back(path)} has shape {tuple(sd[back(path)].shape)}, expected {want}"
      )
  return vit_params.nested({k: np.asarray(v, np.float32) for k, v in flat.items()})


def load(src: str, *, encoder_only: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
  """OpenAI's pickles -> ({'encoder': ..., 'decoder': ...} params, dVAE fields).

  Args:
    src: a folder with `encoder.pkl` and `decoder.pkl`, or the encoder file (its
      `decoder.pkl` sibling is read too).
    encoder_only: convert the encoder alone: enough to tokenize, but a MIM run's
      image summaries decode tokens with the decoder.
  """
  p = epath.Path(src)
  enc_path = p / "encoder.pkl" if p.is_dir() else p
  kind, enc_sd = load_pickle(str(enc_path))
  what = f"DALL-E encoder {enc_path}"
  if kind != "encoder":
    raise ConfigError(f"{enc_path} is a DALL-E decoder; give the encoder (or the folder)")
  fields = encoder_fields(enc_sd, what)
  params = {"encoder": to_params(enc_sd, dvae.Encoder(**fields), jnp.zeros((1, 8, 8, 3)), what)}
  fields["n_init"] = None
  if not encoder_only:
    dec_path = enc_path.parent / "decoder.pkl"
    if not dec_path.is_file():
      raise ConfigError(
        f"DALL-E decoder {dec_path} not found (MIM runs decode tokens with "
        "it for their images); pass --encoder_only to convert the encoder alone"
      )
    kind, dec_sd = load_pickle(str(dec_path))
    what = f"DALL-E decoder {dec_path}"
    if kind != "decoder":
      raise ConfigError(f"{what} is an encoder")
    dec_fields = decoder_fields(dec_sd, what)
    for field in ("n_hid", "n_blk_per_group", "vocab_size"):
      if dec_fields[field] != fields[field]:
        raise ConfigError(
          f"{what}: {field}={dec_fields[field]} but the encoder has {fields[field]}"
        )
    params["decoder"] = to_params(
      dec_sd, dvae.Decoder(**dec_fields), jnp.zeros((1, 1, 1, fields["vocab_size"])), what
    )
    fields["n_init"] = dec_fields["n_init"]
  return params, dict(kind="dvae", **fields)


def save(path: str, params: dict[str, Any], fields: dict[str, Any], source: str) -> None:
  """A beit-jax checkpoint `config.tokenizer.init_from` starts from."""
  common.ensure_new_dir(path, "output folder")
  checkpoint.save_params(path, params, {"converted_from": source, "tokenizer": fields})


def config_flags(fields: dict[str, Any]) -> str:
  """The `--config.tokenizer.*` overrides matching these dVAE fields."""
  return " ".join(
    f"--config.tokenizer.{k}={v}" for k, v in fields.items() if k != "kind" and v is not None
  )
