"""BEiT v2 checkpoints of microsoft/unilm `beit2/` into beit-jax: the pretraining model with
its patch-aggregation decoder, and the VQ-KD tokenizer.

State dicts are built in unilm's naming and layout (random values, tiny sizes) and the
converted models are compared with a PyTorch forward written here from the published
architecture (modeling_pretrain.py VisionTransformerForMaskedImageModelingCLS,
modeling_vqkd.py VQKD, norm_ema_quantizer.py). Skipped without torch.
"""

import argparse
import functools
import json
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from beit_jax import params as params_lib
from beit_jax import tokenizers
from beit_jax.convert.__main__ import main
from beit_jax.errors import ConfigError
from beit_jax.models import vit
from beit_jax.models import vqkd as vqkd_model
from beit_jax.trainers import mim
from beit_jax.training import mim_objective
from configs import vqkd_clip_base
from tests.tiny_config import tiny_config

torch = pytest.importorskip("torch")
F = torch.nn.functional

ATOL = 1e-4
WIDTH, HEADS, MLP, PATCH, SIZE, VOCAB = 32, 2, 64, 8, 32, 16
GRID = SIZE // PATCH
N = GRID * GRID


# --------------------------------------------------------------------- torch reference
def _rel_index(g):
  """unilm RelativePositionBias.relative_position_index for a g x g grid."""
  coords = np.stack(np.meshgrid(np.arange(g), np.arange(g), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (g - 1)
  num = (2 * g - 1) ** 2 + 3
  index = np.zeros((g * g + 1,) * 2, np.int64)
  index[1:, 1:] = rel[:, :, 0] * (2 * g - 1) + rel[:, :, 1]
  index[0, :], index[:, 0], index[0, 0] = num - 3, num - 2, num - 1
  return index


def _t(sd, key):
  return torch.from_numpy(np.ascontiguousarray(sd[key]))


def _block(sd, k, x, bias=None):
  """unilm modeling_finetune.Block: x + gamma_1 attn(norm1 x), x + gamma_2 mlp(norm2 x)."""

  def ln(name, y):
    return F.layer_norm(
      y, (y.shape[-1],), _t(sd, f"{k}.{name}.weight"), _t(sd, f"{k}.{name}.bias"), eps=1e-6
    )

  def lin(name, y):
    return F.linear(y, _t(sd, f"{name}.weight"), _t(sd, f"{name}.bias"))

  b, n, c = x.shape
  y = ln("norm1", x)
  q_bias, v_bias = _t(sd, f"{k}.attn.q_bias"), _t(sd, f"{k}.attn.v_bias")
  qkv = F.linear(
    y, _t(sd, f"{k}.attn.qkv.weight"), torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
  )
  q, kk, v = qkv.reshape(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
  attn = (q * (c // HEADS) ** -0.5) @ kk.transpose(-2, -1)
  if bias is not None:
    attn = attn + bias[None]
  y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
  y = lin(f"{k}.attn.proj", y)
  gamma = f"{k}.gamma_1" in sd
  x = x + (_t(sd, f"{k}.gamma_1") * y if gamma else y)
  y = lin(f"{k}.mlp.fc2", F.gelu(lin(f"{k}.mlp.fc1", ln("norm2", x))))
  return x + (_t(sd, f"{k}.gamma_2") * y if gamma else y)


def _torch_v2(sd, images, mask, early_layers, depth):
  """VisionTransformerForMaskedImageModelingCLS.forward(return_all_tokens=True)."""
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = (
      F.conv2d(x, _t(sd, "patch_embed.proj.weight"), _t(sd, "patch_embed.proj.bias"), stride=PATCH)
      .flatten(2)
      .transpose(1, 2)
    )
    w = torch.from_numpy(mask).unsqueeze(-1).float()
    x = x * (1 - w) + _t(sd, "mask_token") * w
    x = torch.cat([_t(sd, "cls_token").expand(x.shape[0], -1, -1), x], 1)
    table = _t(sd, "rel_pos_bias.relative_position_bias_table")
    bias = (
      table[torch.from_numpy(_rel_index(GRID)).reshape(-1)]
      .reshape(N + 1, N + 1, -1)
      .permute(2, 0, 1)
    )
    for i in range(depth):
      x = _block(sd, f"blocks.{i}", x, bias)
      if i + 1 == early_layers:
        early = x[:, 1:]
    x_c = torch.cat([x[:, [0]], early], 1)
    j = 0
    while f"cls_pt_layers.{j}.norm1.weight" in sd:
      x_c = _block(sd, f"cls_pt_layers.{j}", x_c, bias)
      j += 1

    def head(y):
      y = F.layer_norm(y, (WIDTH,), _t(sd, "norm.weight"), _t(sd, "norm.bias"), eps=1e-6)
      return F.linear(y[:, 1:], _t(sd, "lm_head.weight"), _t(sd, "lm_head.bias")).numpy()

    return head(x), head(x_c)


# ------------------------------------------------------------ unilm state dicts
def _block_sd(rng, k, gamma=True):
  r = lambda *s: rng.normal(0, 0.2, s).astype(np.float32)
  sd = {
    f"{k}.norm1.weight": 1 + r(WIDTH),
    f"{k}.norm1.bias": r(WIDTH),
    f"{k}.attn.qkv.weight": r(3 * WIDTH, WIDTH),
    f"{k}.attn.q_bias": r(WIDTH),
    f"{k}.attn.v_bias": r(WIDTH),
    f"{k}.attn.proj.weight": r(WIDTH, WIDTH),
    f"{k}.attn.proj.bias": r(WIDTH),
    f"{k}.norm2.weight": 1 + r(WIDTH),
    f"{k}.norm2.bias": r(WIDTH),
    f"{k}.mlp.fc1.weight": r(MLP, WIDTH),
    f"{k}.mlp.fc1.bias": r(MLP),
    f"{k}.mlp.fc2.weight": r(WIDTH, MLP),
    f"{k}.mlp.fc2.bias": r(WIDTH),
  }
  if gamma:
    sd.update({f"{k}.gamma_1": r(WIDTH), f"{k}.gamma_2": r(WIDTH)})
  return sd


def _v2_state_dict(depth=2, head_layers=2, seed=0):
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.normal(0, 0.2, s).astype(np.float32)
  sd = {
    "cls_token": r(1, 1, WIDTH),
    "mask_token": r(1, 1, WIDTH),
    "patch_embed.proj.weight": r(WIDTH, 3, PATCH, PATCH),
    "patch_embed.proj.bias": r(WIDTH),
    "rel_pos_bias.relative_position_bias_table": r((2 * GRID - 1) ** 2 + 3, HEADS),
    "rel_pos_bias.relative_position_index": _rel_index(GRID),
    "norm.weight": 1 + r(WIDTH),
    "norm.bias": r(WIDTH),
    "lm_head.weight": r(VOCAB, WIDTH),
    "lm_head.bias": r(VOCAB),
  }
  for i in range(depth):
    sd.update(_block_sd(rng, f"blocks.{i}"))
  for j in range(head_layers):
    sd.update(_block_sd(rng, f"cls_pt_layers.{j}"))
  return sd


def _save(sd, path, **args):
  """As unilm's utils.save_model: {'model': sd, 'args': argparse args, ...}."""
  obj = {
    "model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
    "epoch": 299,
  }
  if args:
    obj["args"] = argparse.Namespace(**args)
  torch.save(obj, str(path))
  return str(path)


def _one_line_error(capsys, argv, match):
  assert main(argv) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("beit_jax.convert: error: ") and "\n" not in err, err
  assert match in err, err
  return err


def _apply_flags(config, printed, after):
  """`config` with the printed `--config.a.b[.c]=v` flags after `after` applied."""
  for flag in printed.split(after, 1)[1].split():
    key, value = flag.removeprefix("--config.").split("=")
    *parents, field = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    old = node[field]
    node[field] = (
      value == "True"
      if isinstance(old, bool)
      else type(old)(value)
      if old is not None
      else int(value)
    )
  return config


def _inputs(seed=0, batch=2):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32), rng.random((batch, N)) < 0.4)


# ------------------------------------------------------------- v2 pretraining model
def test_v2_pretraining_checkpoint_keeps_its_decoder_and_matches_torch(tmp_path, capsys):
  sd = _v2_state_dict()
  src = _save(
    sd,
    tmp_path / "beitv2.pth",
    early_layers=1,
    head_layers=2,
    model="beit_base_patch16_224_8k_vocab_cls_pt",
  )
  dst = str(tmp_path / "out")
  assert main(["--from=unilm", "--to=beit_jax", src, dst]) == 0
  printed = capsys.readouterr().out
  assert (
    "--config.model.patch_aggregation.layer=1 --config.model.patch_aggregation.depth=2"
  ) in printed
  params = params_lib.read(dst)
  assert {"cls_pt_layers_0", "cls_pt_layers_1"} <= set(params)
  assert (
    json.loads((tmp_path / "out" / "config.json").read_text())["vit"]["patch_aggregation_layer"]
    == 1
  )

  # The MIM model of a v2 run with the printed flags takes exactly these params.
  config = tiny_config()
  config.model.patch_aggregation = dict(layer=9, depth=5)
  config = _apply_flags(config, printed, "the matching model:")
  model = mim_objective.make_model(config, train=False)
  images, mask = _inputs()
  init = jax.jit(model.init)(jax.random.key(0), jnp.asarray(images), jnp.asarray(mask))["params"]
  params = params_lib.cast(init, params, "converted")
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(images), jnp.asarray(mask))
  want, want_c = _torch_v2(sd, images, mask, early_layers=1, depth=2)
  assert out["mim_logits_c"].shape == want_c.shape == (2, N, VOCAB)
  np.testing.assert_allclose(out["mim_logits"], want, atol=ATOL)
  np.testing.assert_allclose(out["mim_logits_c"], want_c, atol=ATOL)
  # The decoder matters: a wrong aggregated layer gives other logits.
  _, other = _torch_v2(sd, images, mask, early_layers=2, depth=2)
  assert np.abs(other - want_c).max() > 1e-2
  print(
    f"max |diff| mim {np.abs(out['mim_logits'] - want).max():.2e}, "
    f"mim_c {np.abs(out['mim_logits_c'] - want_c).max():.2e}"
  )

  # Fine-tuning starts from it without the decoder (per-block tables, classifier).
  ft = vit.VisionTransformer(
    patch_size=PATCH,
    width=WIDTH,
    depth=2,
    num_heads=HEADS,
    mlp_dim=MLP,
    image_size=SIZE,
    num_classes=5,
    use_shared_rel_pos_bias=False,
    use_rel_pos_bias=True,
    truncate_init=False,
  )
  target = jax.jit(ft.init)(jax.random.key(0), jnp.asarray(images))["params"]
  loaded = params_lib.load_into(
    target,
    dst,
    vit=params_lib.ViTFit(image_size=SIZE, rel_pos="per_layer", num_heads=HEADS),
    drop=params_lib.OTHER_USES,
    fresh=params_lib.CLASSIFIER,
  )
  assert not any(k.startswith("cls_pt") for k in loaded)
  np.testing.assert_array_equal(
    loaded["blocks_1"]["attn"]["relative_position_bias_table"],
    sd["rel_pos_bias.relative_position_bias_table"],
  )

  # HF export drops it.
  pytest.importorskip("transformers")
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  assert main(["--from=beit_jax", "--to=hf", dst, str(tmp_path / "hf")]) == 0
  exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
  assert exported and not any("cls_pt" in k for k in exported)


def test_v2_decoder_layer_and_drop_options(tmp_path, capsys):
  sd = _v2_state_dict()
  bare = _save(sd, tmp_path / "bare.pth")  # no args: the layer is not recorded
  _one_line_error(
    capsys,
    ["--from=unilm", "--to=beit_jax", bare, str(tmp_path / "o1")],
    "does not record which block it reads (args.early_layers); pass --patch_aggregation_layer",
  )
  _one_line_error(
    capsys,
    ["--from=unilm", "--to=beit_jax", "--patch_aggregation_layer=3", bare, str(tmp_path / "o2")],
    "patch aggregation layer 3",
  )
  assert (
    main(
      ["--from=unilm", "--to=beit_jax", "--patch_aggregation_layer=2", bare, str(tmp_path / "o3")]
    )
    == 0
  )
  assert "--config.model.patch_aggregation.layer=2" in capsys.readouterr().out
  assert (
    main(["--from=unilm", "--to=beit_jax", "--patch_aggregation=drop", bare, str(tmp_path / "o4")])
    == 0
  )
  assert "patch_aggregation" not in capsys.readouterr().out
  assert not any(k.startswith("cls_pt") for k in params_lib.read(str(tmp_path / "o4")))
  # A v2 run may start from it: its decoder then starts from the init, the rest is loaded.
  config = tiny_config()
  config.model.patch_aggregation = dict(layer=2, depth=2)
  config.init_from = str(tmp_path / "o4")
  config.tokenizer.vocab_size = VOCAB
  task = mim.make_task(config, frozen={"tokenizer": (types.SimpleNamespace(tokenize=None), None)})
  init = jax.jit(task.init_params)(jax.random.key(0))
  loaded = task.load_params(init)
  np.testing.assert_array_equal(
    loaded["cls_pt_layers_1"]["mlp"]["fc1"]["kernel"],
    init["cls_pt_layers_1"]["mlp"]["fc1"]["kernel"],
  )
  np.testing.assert_allclose(
    loaded["blocks_1"]["mlp"]["fc1"]["kernel"], sd["blocks.1.mlp.fc1.weight"].T
  )
  # An incomplete decoder, and unilm's unshared head, are one-line errors.
  broken = dict(sd)
  del broken["cls_pt_layers.1.mlp.fc2.bias"]
  _one_line_error(
    capsys,
    [
      "--from=unilm",
      "--to=beit_jax",
      _save(broken, tmp_path / "broken.pth", early_layers=1),
      str(tmp_path / "o5"),
    ],
    "missing keys cls_pt_layers.1.mlp.fc2.bias",
  )
  unshared = dict(sd, **{"cls_pt_norm.weight": np.ones(WIDTH, np.float32)})
  _one_line_error(
    capsys,
    [
      "--from=unilm",
      "--to=beit_jax",
      _save(unshared, tmp_path / "unshared.pth", early_layers=1),
      str(tmp_path / "o6"),
    ],
    "--patch_aggregation=drop",
  )
  # The backbone's errors still come first.
  no_norm = dict(sd)
  del no_norm["norm.weight"]
  _one_line_error(
    capsys,
    [
      "--from=unilm",
      "--to=beit_jax",
      _save(no_norm, tmp_path / "no_norm.pth", early_layers=1),
      str(tmp_path / "o7"),
    ],
    "missing keys norm.weight",
  )


# ------------------------------------------------------------------------ VQ-KD
CODES, CODE_DIM, TEACHER_DIM = 16, 8, 12


def _vit_part(rng, part, in_chans, patch, grid, depth):
  r = lambda *s: rng.normal(0, 0.2, s).astype(np.float32)
  sd = {
    f"{part}.cls_token": r(1, 1, WIDTH),
    f"{part}.pos_embed": r(1, grid * grid + 1, WIDTH),
    f"{part}.patch_embed.proj.weight": r(WIDTH, in_chans, patch, patch),
    f"{part}.patch_embed.proj.bias": r(WIDTH),
    f"{part}.fc_norm.weight": 1 + r(WIDTH),
    f"{part}.fc_norm.bias": r(WIDTH),
  }
  for i in range(depth):
    sd.update(_block_sd(rng, f"{part}.blocks.{i}", gamma=False))
  return sd


def _vqkd_state_dict(seed=0):
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.normal(0, 0.2, s).astype(np.float32)
  codebook = rng.normal(size=(CODES, CODE_DIM)).astype(np.float32)
  codebook /= np.linalg.norm(codebook, axis=1, keepdims=True)  # EMA keeps codes unit
  sd = {
    **_vit_part(rng, "encoder", 3, PATCH, GRID, 2),
    **_vit_part(rng, "decoder", CODE_DIM, 1, GRID, 1),
    "encode_task_layer.0.weight": r(WIDTH, WIDTH),
    "encode_task_layer.0.bias": r(WIDTH),
    "encode_task_layer.2.weight": r(CODE_DIM, WIDTH),
    "encode_task_layer.2.bias": r(CODE_DIM),
    "decode_task_layer.0.weight": r(WIDTH, WIDTH),
    "decode_task_layer.0.bias": r(WIDTH),
    "decode_task_layer.2.weight": r(TEACHER_DIM, WIDTH),
    "decode_task_layer.2.bias": r(TEACHER_DIM),
    "quantize.embedding.weight": codebook,
    "quantize.embedding.cluster_size": rng.random(CODES).astype(np.float32),
    "quantize.embedding.embed_avg": codebook.copy(),
    "quantize.embedding.initted": np.ones(1, np.float32),
    "quantize.cluster_size": rng.random(CODES).astype(np.float32) * 5,
    # What a training checkpoint also holds: the teacher and its input scaling.
    "teacher_model.visual.proj": r(WIDTH, TEACHER_DIM),
    "scaling_layer.shift": r(1, 3, 1, 1),
    "scaling_layer.scale": r(1, 3, 1, 1),
  }
  return sd


def _torch_vqkd(sd, images):
  """VQKD.encode (-> indices) and VQKD.decode of the quantized codes, images in [-1, 1]."""

  def features(part, x, depth):
    patch = sd[f"{part}.patch_embed.proj.weight"].shape[-1]
    x = (
      F.conv2d(
        x,
        _t(sd, f"{part}.patch_embed.proj.weight"),
        _t(sd, f"{part}.patch_embed.proj.bias"),
        stride=patch,
      )
      .flatten(2)
      .transpose(1, 2)
    )
    x = torch.cat([_t(sd, f"{part}.cls_token").expand(x.shape[0], -1, -1), x], 1)
    x = x + _t(sd, f"{part}.pos_embed")
    for i in range(depth):
      x = _block(sd, f"{part}.blocks.{i}", x)
    return F.layer_norm(
      x[:, 1:], (WIDTH,), _t(sd, f"{part}.fc_norm.weight"), _t(sd, f"{part}.fc_norm.bias"), eps=1e-6
    )

  def task(name, x):
    x = torch.tanh(F.linear(x, _t(sd, f"{name}.0.weight"), _t(sd, f"{name}.0.bias")))
    return F.linear(x, _t(sd, f"{name}.2.weight"), _t(sd, f"{name}.2.bias"))

  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    z = task("encode_task_layer", features("encoder", x, 2))  # [B, N, C]
    z = F.normalize(z, dim=-1).reshape(-1, CODE_DIM)
    weight = _t(sd, "quantize.embedding.weight")
    d = z.pow(2).sum(1, keepdim=True) + weight.pow(2).sum(1) - 2 * z @ weight.t()
    codes = d.argmin(1)
    z_q = weight[codes].reshape(images.shape[0], GRID, GRID, CODE_DIM).permute(0, 3, 1, 2)
    rec = task("decode_task_layer", features("decoder", z_q, 1))
  return codes.reshape(-1, GRID, GRID).numpy(), z_q.permute(0, 2, 3, 1).numpy(), rec.numpy()


def _tokenizer_config(printed, dst):
  tok = vqkd_clip_base.vqkd_tokenizer()
  config = ml_collections.ConfigDict(dict(tokenizer=tok, input=dict(tokenizer_image_size=224)))
  config = _apply_flags(config, printed, f"--config.tokenizer.init_from={dst}")
  config.tokenizer.init_from = dst
  return config


def test_vqkd_checkpoint_is_a_vqkd_tokenizer_matching_torch(tmp_path, capsys):
  sd = _vqkd_state_dict()
  src = _save(sd, tmp_path / "vqkd.pth", model="vqkd_encoder_base_decoder_3x768x12_clip")
  dst = str(tmp_path / "vqkd")
  assert main(["--from=unilm", "--to=beit_jax", "--num_heads=2", src, dst]) == 0
  printed = capsys.readouterr().out
  assert "--config.tokenizer.kind=vqkd" in printed
  assert "--config.input.tokenizer_image_size=32" in printed
  config = _tokenizer_config(printed, dst)
  tokenizer, variables = tokenizers.load(config.tokenizer, dst)
  assert (
    tokenizers.grid(
      ml_collections.ConfigDict(
        dict(tokenizer=config.tokenizer, input=dict(tokenizer_image_size=SIZE, patch_size=PATCH))
      )
    )
    == GRID
  )

  images = np.random.default_rng(3).uniform(-1, 1, (4, SIZE, SIZE, 3)).astype(np.float32)
  codes = jax.jit(tokenizer.tokenize)(variables, jnp.asarray(images))
  want_codes, want_zq, want_rec = _torch_vqkd(sd, images)
  assert codes.shape == (4, GRID, GRID)
  np.testing.assert_array_equal(codes, want_codes)
  assert len(np.unique(want_codes)) > 3  # the test can tell codes apart
  model = vqkd_model.VQKD(**_model_sizes())
  run = lambda method, x: jax.jit(functools.partial(model.apply, method=method))(variables, x)
  z = run(vqkd_model.VQKD.encode, jnp.asarray(images))
  z_q, _, _ = run(vqkd_model.VQKD.quantize, z)
  np.testing.assert_allclose(z_q, want_zq, atol=1e-5)
  rec = run(vqkd_model.VQKD.decode, z_q)
  assert rec.shape == (4, N, TEACHER_DIM)
  np.testing.assert_allclose(rec, want_rec, atol=ATOL)
  print(f"max |diff| decoder output {np.abs(np.asarray(rec) - want_rec).max():.2e}")
  np.testing.assert_array_equal(variables["codebook"]["cluster_size"], sd["quantize.cluster_size"])
  assert bool(variables["codebook"]["initted"])


def _model_sizes():
  return dict(
    image_size=SIZE,
    patch_size=PATCH,
    width=WIDTH,
    depth=2,
    num_heads=HEADS,
    mlp_dim=MLP,
    decoder_width=WIDTH,
    decoder_depth=1,
    decoder_num_heads=HEADS,
    decoder_mlp_dim=MLP,
    num_codes=CODES,
    code_dim=CODE_DIM,
    teacher_dim=TEACHER_DIM,
  )


def test_vqkd_bad_input_is_one_line(tmp_path, capsys):
  good = _vqkd_state_dict()

  def run(sd, name):
    return [
      "--from=unilm",
      "--to=beit_jax",
      "--num_heads=2",
      _save(sd, tmp_path / f"{name}.pth"),
      str(tmp_path / f"out_{name}"),
    ]

  # The codebook's dimension is not what the encoder gives and the decoder takes.
  small = dict(good, **{"quantize.embedding.weight": good["quantize.embedding.weight"][:, :6]})
  _one_line_error(
    capsys,
    run(small, "codebook"),
    "encode_task_layer.2 outputs 8-d codes but the codebook quantize.embedding.weight is 16 x 6",
  )
  # The decoder's head does not fit its width.
  bad = dict(good, **{"decode_task_layer.0.weight": np.zeros((WIDTH, 20), np.float32)})
  _one_line_error(
    capsys, run(bad, "decoder"), "decode_task_layer.0.weight has shape (32, 20), expected (32, 32)"
  )
  # Not (completely) a VQ-KD.
  partial = {k: v for k, v in good.items() if not k.startswith("quantize.")}
  _one_line_error(
    capsys, run(partial, "partial"), "is not a VQ-KD tokenizer: no quantize.embedding.weight"
  )
  _one_line_error(
    capsys,
    run({"weight": np.zeros(3, np.float32)}, "other"),
    "nor a VQ-KD tokenizer: no quantize.embedding.weight",
  )
  extra = dict(good, **{"encoder.blocks.0.gamma_1": np.ones(WIDTH, np.float32)})
  _one_line_error(capsys, run(extra, "extra"), "unexpected keys encoder.blocks.0.gamma_1")
  _one_line_error(
    capsys,
    ["--to=hf" if a == "--to=beit_jax" else a for a in run(good, "to_hf")],
    "a VQ-KD tokenizer converts --to=beit_jax only",
  )
  # Without --num_heads, the standard head count of the width (none for 32).
  _one_line_error(
    capsys,
    [a for a in run(good, "heads") if a != "--num_heads=2"],
    "cannot tell the number of heads of the encoder's width 32; pass --num_heads",
  )

  # A converted tokenizer against a config with another teacher or codebook dimension.
  dst = str(tmp_path / "ok")
  assert (
    main(["--from=unilm", "--to=beit_jax", "--num_heads=2", _save(good, tmp_path / "ok.pth"), dst])
    == 0
  )
  printed = capsys.readouterr().out
  for field, value in (("teacher_dim", 768), ("code_dim", 32)):
    config = _tokenizer_config(printed, dst)
    config.tokenizer[field] = value
    with pytest.raises(
      ConfigError,
      match=rf"tokenizer.{field}={value} but the tokenizer "
      rf"at .* has {dict(teacher_dim=TEACHER_DIM, code_dim=CODE_DIM)[field]}",
    ):
      tokenizers.load(config.tokenizer, dst)
  # A ViT checkpoint is not a VQ-KD tokenizer.
  vit_dst = str(tmp_path / "vit")
  assert (
    main(
      [
        "--from=unilm",
        "--to=beit_jax",
        _save(_v2_state_dict(), tmp_path / "v2.pth", early_layers=1),
        vit_dst,
      ]
    )
    == 0
  )
  with pytest.raises(ConfigError, match="is not a VQ-KD tokenizer"):
    tokenizers.load(_tokenizer_config(printed, dst).tokenizer, vit_dst)
