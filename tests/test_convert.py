"""Tests of checkpoint conversion (beit_jax/convert): same outputs as the PyTorch models.

Tests that need torch / transformers skip cleanly without them
(`pip install -r requirements-interop.txt` installs them).
"""

import argparse
import collections
import json
import math
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import interpolate

from beit_jax.training import checkpoint
from beit_jax import params as params_lib
from beit_jax import tokenizers
from beit_jax.convert import dalle
from beit_jax.convert import hf
from beit_jax.params import vit as vit_params
from beit_jax.convert import relpos
from beit_jax.convert import unilm
from beit_jax.convert.__main__ import main
from beit_jax.errors import ConfigError
from beit_jax.models import dvae
from beit_jax.models import vit
from beit_jax.training import mim_objective
from tests.tiny_config import tiny_config

HF_TINY = dict(
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=2,
  intermediate_size=64,
  image_size=32,
  patch_size=8,
  layer_norm_eps=1e-6,
)
VIT_TINY = dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, image_size=32)
N = 16  # 4x4 patches
VOCAB, CLASSES = 16, 5
ATOL = 1e-4


def _images(seed=0, batch=2, size=32):
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _mask(seed=1, batch=2):
  return np.random.default_rng(seed).random((batch, N)) < 0.4


def _ours(params, kw, images, mask=None):
  model = vit.VisionTransformer(**kw)
  return model.apply(
    {"params": vit_params.nested(params)},
    jnp.asarray(images),
    None if mask is None else jnp.asarray(mask),
  )


def _random_vit_params(kw, seed=0):
  """Generic nonzero params (tables, biases, gammas) of VisionTransformer(**kw)."""
  rng = np.random.default_rng(seed)
  return {
    path: rng.normal(0.0, 0.2, shape).astype(np.float32) + (1.0 if path.endswith("/scale") else 0.0)
    for path, shape in unilm.expected_shapes(kw).items()
  }


def _kw(**overrides):
  kw = dict(
    VIT_TINY,
    vocab_size=VOCAB,
    num_classes=0,
    use_abs_pos_emb=False,
    use_shared_rel_pos_bias=True,
    use_rel_pos_bias=False,
    layer_scale_init=0.1,
  )
  return dict(kw, **overrides)


# ------------------------------------------------------ relative position tables
def _unilm_resize(table, src, dst):
  """unilm run_class_finetuning.py's resize, with interp2d's FITPACK s=0 spline."""
  extra, rel = table[-3:], table[:-3].astype(np.float64)
  src_size, dst_size = 2 * src - 1, 2 * dst - 1

  def gp(a, r, n):
    return a * (1.0 - r**n) / (1.0 - r)

  left, right = 1.01, 1.5
  while right - left > 1e-6:
    q = (left + right) / 2.0
    if gp(1, q, src_size // 2) > dst_size // 2:
      right = q
    else:
      left = q
  dis, cur = [], 1
  for i in range(src_size // 2):
    dis.append(cur)
    cur += q ** (i + 1)
  x = [-d for d in reversed(dis)] + [0] + dis
  t = dst_size // 2.0
  dx = np.arange(-t, t + 0.1, 1.0)
  heads = []
  for i in range(rel.shape[1]):
    f = interpolate.RectBivariateSpline(
      x, x, rel[:, i].reshape(src_size, src_size), kx=3, ky=3, s=0
    )
    heads.append(f(dx, dx).reshape(-1, 1))
  return np.concatenate([np.concatenate(heads, -1), extra])


def _table(grid, heads=2, seed=0):
  rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
  return np.random.default_rng(seed).normal(size=(rows, heads)).astype(np.float32)


def test_resize_rel_pos_table_same_grid_is_identity():
  table = _table((3, 5))
  np.testing.assert_array_equal(relpos.resize_rel_pos_table(table, (3, 5), (3, 5)), table)


def test_resize_rel_pos_table_shrink_keeps_each_offset():
  big, small = (4, 5), (2, 3)
  table = _table(big)
  out = relpos.resize_rel_pos_table(table, big, small)
  # The bias of every token pair of the small grid is that of the same pair of
  # offsets placed in the big grid; the [CLS] rows are kept.
  embed = np.array([0] + [1 + r * big[1] + c for r in range(small[0]) for c in range(small[1])])
  big_bias = table[vit.relative_position_index(big)][np.ix_(embed, embed)]
  np.testing.assert_array_equal(out[vit.relative_position_index(small)], big_bias)


@pytest.mark.parametrize("src,dst", [(7, 12), (14, 24)])
def test_resize_rel_pos_table_grow_matches_unilm(src, dst):
  table = _table((src, src), heads=3)
  out = relpos.resize_rel_pos_table(table, (src, src), (dst, dst))
  assert out.shape == ((2 * dst - 1) ** 2 + 3, 3)
  np.testing.assert_array_equal(out[-3:], table[-3:])
  np.testing.assert_allclose(out, _unilm_resize(table, src, dst), atol=1e-5)


def test_resize_rel_pos_table_rejects_a_table_of_another_grid():
  with pytest.raises(ConfigError, match=r"does not fit a 3x3 patch grid.*\[28, heads\]"):
    relpos.resize_rel_pos_table(_table((4, 4)), (3, 3), (5, 5))


def test_resize_abs_pos_embed_keeps_cls_and_same_grid():
  pos = np.random.default_rng(0).normal(size=(1, 17, 6)).astype(np.float32)
  np.testing.assert_array_equal(relpos.resize_abs_pos_embed(pos, (4, 4), (4, 4)), pos)
  out = relpos.resize_abs_pos_embed(pos, (4, 4), (6, 6))
  assert out.shape == (1, 37, 6)
  np.testing.assert_array_equal(out[0, 0], pos[0, 0])


# ------------------------------------------------------------- layouts (no torch)
def test_shared_and_per_layer_rel_pos_compute_the_same():
  kw = _kw()
  params = _random_vit_params(kw)
  images, mask = _images(), _mask()
  per_layer, kw_pl = vit_params.set_rel_pos(params, kw, "per_layer")
  assert kw_pl["use_rel_pos_bias"] and not kw_pl["use_shared_rel_pos_bias"]
  vit_params.check(per_layer, kw_pl, "per-layer params")
  np.testing.assert_allclose(
    _ours(per_layer, kw_pl, images, mask)["mim_logits"],
    _ours(params, kw, images, mask)["mim_logits"],
    atol=1e-5,
  )
  shared, kw_sh = vit_params.set_rel_pos(per_layer, kw_pl, "shared")
  assert kw_sh == kw and shared.keys() == params.keys()
  for path in params:
    np.testing.assert_array_equal(shared[path], params[path])
  per_layer["blocks_1/attn/relative_position_bias_table"] += 1.0
  with pytest.raises(ConfigError, match=r"--rel_pos=shared: blocks 1 have"):
    vit_params.set_rel_pos(per_layer, kw_pl, "shared")


def test_resize_to_another_image_size_gives_a_working_model():
  kw = _kw(use_abs_pos_emb=True)
  params, kw48 = vit_params.adapt(_random_vit_params(kw), kw, image_size=48)
  assert kw48["image_size"] == 48
  vit_params.check(params, kw48, "resized")
  out = _ours(params, kw48, _images(size=48))
  assert out["mim_logits"].shape == (2, 36, VOCAB)
  with pytest.raises(ConfigError, match="image_size=36 must be a positive multiple"):
    vit_params.adapt(params, kw48, image_size=36)


def test_beit_jax_checkpoint_round_trip_and_its_fields(tmp_path):
  kw = _kw(vocab_size=0, num_classes=CLASSES, use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
  params = _random_vit_params(kw)
  vit_params.save(str(tmp_path / "ckpt"), params, kw, "test")
  loaded, kw2 = vit_params.load(str(tmp_path / "ckpt"))
  assert kw2 == kw
  for path in params:
    np.testing.assert_array_equal(loaded[path], params[path])
  # Without config.json the heads come from the per-layer tables, the rest from shapes.
  (tmp_path / "ckpt" / "config.json").unlink()
  assert vit_params.load(str(tmp_path / "ckpt"))[1] == kw


def test_run_workdir_fields_come_from_its_config(tmp_path):
  """A run's workdir: heads (not in any weight here) and image size from config.json."""
  config = tiny_config()
  config.model.update(dict(use_abs_pos_emb=True, use_shared_rel_pos_bias=False))
  kw = _kw(
    vocab_size=config.tokenizer.vocab_size, use_abs_pos_emb=True, use_shared_rel_pos_bias=False
  )
  checkpoint.save_params(str(tmp_path), vit_params.nested(_random_vit_params(kw)))
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  assert vit_params.load(str(tmp_path))[1] == kw
  (tmp_path / "config.json").unlink()
  with pytest.raises(ConfigError, match="cannot tell the number of heads of width 32"):
    vit_params.load(str(tmp_path))
  assert vit_params.load(str(tmp_path), num_heads=2)[1] == kw


def _with_flags(config, flags):
  """`config` with the converter's printed `--config.a.b=value` overrides applied."""
  for flag in flags.split():
    key, value = flag.removeprefix("--config.").split("=")
    section, field = key.split(".")
    old = config[section][field]
    config[section][field] = (
      value == "True"
      if isinstance(old, bool)
      else type(old)(value)
      if old is not None
      else int(value)
    )
  return config


def test_converted_checkpoint_fits_the_mim_model_its_flags_describe(tmp_path):
  """The printed `--config.*` flags build a MIM model of exactly the saved params."""
  kw = _kw(vocab_size=64, layer_scale_init=0.0, use_abs_pos_emb=True, use_shared_rel_pos_bias=False)
  vit_params.save(str(tmp_path / "ckpt"), _random_vit_params(kw), kw, "test")
  loaded = params_lib.read(str(tmp_path / "ckpt"))
  model = mim_objective.make_model(_with_flags(tiny_config(), vit_params.config_flags(kw)))
  want = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, N), bool)
  )["params"]
  assert jax.tree.structure(loaded) == jax.tree.structure(want)
  assert jax.tree.map(np.shape, loaded) == jax.tree.map(lambda x: x.shape, want)


def _one_line_error(capsys, argv, match):
  assert main(argv) == 1
  captured = capsys.readouterr()
  err = captured.err.strip()
  assert err.startswith("beit_jax.convert: error: ") and "\n" not in err, err
  assert "Traceback" not in captured.err
  assert match in err, err
  return err


def test_cli_errors_without_torch(tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  _one_line_error(
    capsys,
    ["--from=hf", "--to=beit_jax", str(empty), str(tmp_path / "o")],
    "is not a HuggingFace save_pretrained folder (no config.json)",
  )
  (empty / "config.json").write_text(json.dumps({"model_type": "vit"}))
  _one_line_error(
    capsys,
    ["--from=hf", "--to=beit_jax", str(empty), str(tmp_path / "o")],
    "holds a 'vit' model, not 'beit'",
  )
  (empty / "config.json").write_text(json.dumps({"model_type": "beit"}))
  _one_line_error(
    capsys,
    ["--from=hf", "--to=beit_jax", str(empty), str(tmp_path / "o")],
    "has no model.safetensors or pytorch_model.bin",
  )
  (empty / "model.safetensors").write_text("not safetensors")
  _one_line_error(
    capsys,
    ["--from=hf", "--to=beit_jax", str(empty), str(tmp_path / "o")],
    "is not a safetensors file numpy can read",
  )
  _one_line_error(
    capsys,
    ["--from=dalle", "--to=hf", str(empty), str(tmp_path / "o")],
    "--from=dalle converts --to=beit_jax only",
  )
  _one_line_error(
    capsys,
    ["--from=beit_jax", "--to=hf", str(empty), str(tmp_path / "o")],
    "no beit-jax checkpoint found",
  )


# ----------------------------------------------------------- HuggingFace (torch)
def _randomize(torch, model):
  """Nonzero random values everywhere (tables, q/v biases, lambdas), so all matter."""
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(0.2 * torch.randn(p.shape, generator=gen))
      if "layernorm" in name and name.endswith("weight"):
        p.add_(1.0)
  return model.eval()


def _hf_out(torch, model, images, mask=None):
  x = torch.from_numpy(images).permute(0, 3, 1, 2)
  with torch.no_grad():
    if mask is None:
      return model(x)
    return model(x, bool_masked_pos=torch.from_numpy(mask))


def _hf_model(torch, transformers, tmp_path_factory, cls_name, **config):
  cls = getattr(transformers, cls_name)
  model = _randomize(torch, cls(transformers.BeitConfig(**HF_TINY, **config)))
  folder = tmp_path_factory.mktemp(cls_name)
  model.save_pretrained(str(folder))
  return model, str(folder)


@pytest.fixture(scope="module")
def hf_mim(torch, transformers, tmp_path_factory):
  return _hf_model(
    torch,
    transformers,
    tmp_path_factory,
    "BeitForMaskedImageModeling",
    vocab_size=VOCAB,
    use_mask_token=True,
    use_shared_relative_position_bias=True,
    layer_scale_init_value=0.1,
  )


@pytest.fixture(scope="module")
def hf_cls(torch, transformers, tmp_path_factory):
  return _hf_model(
    torch,
    transformers,
    tmp_path_factory,
    "BeitForImageClassification",
    num_labels=CLASSES,
    use_relative_position_bias=True,
    layer_scale_init_value=0.1,
  )


def test_hf_mim_parity(torch, hf_mim):
  model, folder = hf_mim
  params, kw = hf.load(folder)
  assert kw == _kw()
  images, mask = _images(), _mask()
  ours = _ours(params, kw, images, mask)["mim_logits"]
  theirs = _hf_out(torch, model, images, mask).logits.numpy()
  assert ours.shape == theirs.shape == (2, N, VOCAB)
  np.testing.assert_allclose(ours, theirs, atol=ATOL)


def test_hf_classification_parity(torch, hf_cls):
  model, folder = hf_cls
  params, kw = hf.load(folder)
  assert kw == _kw(
    vocab_size=0, num_classes=CLASSES, use_shared_rel_pos_bias=False, use_rel_pos_bias=True
  )
  images = _images()
  ours = _ours(params, kw, images)["logits"]
  np.testing.assert_allclose(ours, _hf_out(torch, model, images).logits.numpy(), atol=ATOL)
  # A fine-tuned model has no mask token: it becomes zeros (unused there).
  np.testing.assert_array_equal(params["mask_token"], 0.0)


def test_hf_bin_with_in_memory_names(torch, hf_mim, tmp_path):
  """pytorch_model.bin of `model.state_dict()` (transformers 5's own names) reads the same."""
  model, folder = hf_mim
  (tmp_path / "config.json").write_text(open(f"{folder}/config.json").read())
  torch.save(model.state_dict(), str(tmp_path / "pytorch_model.bin"))
  params, kw = hf.load(str(tmp_path))
  want, want_kw = hf.load(folder)
  assert kw == want_kw and params.keys() == want.keys()
  for path in params:
    np.testing.assert_array_equal(params[path], want[path])


def test_hf_base_model_parity(torch, transformers, tmp_path_factory):
  """BeitModel: absolute position embedding, no LayerScale, [CLS] pooling."""
  model, folder = _hf_model(
    torch,
    transformers,
    tmp_path_factory,
    "BeitModel",
    use_absolute_position_embeddings=True,
    use_mean_pooling=False,
    layer_scale_init_value=0.0,
  )
  params, kw = hf.load(folder)
  assert kw == _kw(
    vocab_size=0, use_abs_pos_emb=True, use_shared_rel_pos_bias=False, layer_scale_init=0.0
  )
  images = _images()
  np.testing.assert_allclose(
    _ours(params, kw, images)["tokens"],
    _hf_out(torch, model, images).last_hidden_state.numpy(),
    atol=ATOL,
  )


@pytest.mark.parametrize("which", ["mim", "cls"])
def test_export_round_trip(torch, transformers, hf_mim, hf_cls, tmp_path, which):
  source, folder = hf_mim if which == "mim" else hf_cls
  params, kw = hf.load(folder)
  arch = hf.save_pretrained(str(tmp_path / "out"), params, kw)
  assert arch == type(source).__name__
  exported, info = getattr(transformers, arch).from_pretrained(
    str(tmp_path / "out"), output_loading_info=True
  )
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  images, mask = _images(seed=3), (_mask(seed=4) if which == "mim" else None)
  ours = _ours(params, kw, images, mask)["mim_logits" if which == "mim" else "logits"]
  np.testing.assert_allclose(
    _hf_out(torch, exported.eval(), images, mask).logits.numpy(), ours, atol=ATOL
  )
  again, kw_again = hf.load(str(tmp_path / "out"))
  assert kw_again == kw and again.keys() == params.keys()
  for path in params:
    np.testing.assert_array_equal(again[path], params[path])


# ------------------------------------------------------------ unilm (torch)
def _unilm_index(grid):
  """unilm's RelativePositionBias.relative_position_index buffer, written out again."""
  h, w = grid
  coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  rel[:, :, 0] += h - 1
  rel[:, :, 1] += w - 1
  rel[:, :, 0] *= 2 * w - 1
  num = (2 * h - 1) * (2 * w - 1) + 3
  index = np.zeros((h * w + 1,) * 2, np.int64)
  index[1:, 1:] = rel.sum(-1)
  index[0, 0:], index[0:, 0], index[0, 0] = num - 3, num - 2, num - 1
  return index


def _unilm_state_dict(folder, finetune):
  """The unilm modeling_pretrain / modeling_finetune state dict of a saved HF model."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  h = load_file(f"{folder}/model.safetensors")
  sd = {
    "cls_token": h["beit.embeddings.cls_token"],
    "patch_embed.proj.weight": h["beit.embeddings.patch_embeddings.projection.weight"],
    "patch_embed.proj.bias": h["beit.embeddings.patch_embeddings.projection.bias"],
  }
  for i in range(HF_TINY["num_hidden_layers"]):
    layer, block = f"beit.encoder.layer.{i}.", f"blocks.{i}."
    att = layer + "attention.attention."
    for ours, theirs in [
      ("norm1", "layernorm_before"),
      ("norm2", "layernorm_after"),
      ("attn.proj", "attention.output.dense"),
      ("mlp.fc1", "intermediate.dense"),
      ("mlp.fc2", "output.dense"),
    ]:
      for p in ("weight", "bias"):
        sd[f"{block}{ours}.{p}"] = h[f"{layer}{theirs}.{p}"]
    sd[block + "attn.qkv.weight"] = np.concatenate(
      [h[f"{att}{n}.weight"] for n in ("query", "key", "value")]
    )
    sd[block + "attn.q_bias"] = h[att + "query.bias"]
    sd[block + "attn.v_bias"] = h[att + "value.bias"]
    sd[block + "gamma_1"], sd[block + "gamma_2"] = h[layer + "lambda_1"], h[layer + "lambda_2"]
    if finetune:
      sd[block + "attn.relative_position_bias_table"] = h[
        att + "relative_position_bias.relative_position_bias_table"
      ]
      sd[block + "attn.relative_position_index"] = _unilm_index((4, 4))
  if finetune:
    for ours, theirs in [("fc_norm", "beit.pooler.layernorm"), ("head", "classifier")]:
      for p in ("weight", "bias"):
        sd[f"{ours}.{p}"] = h[f"{theirs}.{p}"]
  else:
    sd["mask_token"] = h["beit.embeddings.mask_token"]
    sd["rel_pos_bias.relative_position_bias_table"] = h[
      "beit.encoder.relative_position_bias.relative_position_bias_table"
    ]
    sd["rel_pos_bias.relative_position_index"] = _unilm_index((4, 4))
    for ours, theirs in [("norm", "layernorm"), ("lm_head", "lm_head")]:
      for p in ("weight", "bias"):
        sd[f"{ours}.{p}"] = h[f"{theirs}.{p}"]
    # BEiT v2's patch-aggregation decoder, dropped on import.
    sd["cls_pt_layers.0.norm1.weight"] = np.ones(32, np.float32)
    sd["cls_pt_layers.0.attn.qkv.weight"] = np.ones((96, 32), np.float32)
  return sd


def _save_unilm(torch, sd, path):
  """As unilm's utils.save_model does: {'model': sd, ...} with its argparse args."""
  torch.save(
    {
      "model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
      "epoch": 799,
      "args": argparse.Namespace(model="beit_base_patch16_224"),
    },
    str(path),
  )
  return str(path)


@pytest.mark.parametrize("finetune", [False, True])
def test_unilm_state_dict_parity(torch, hf_mim, hf_cls, tmp_path, finetune):
  model, folder = hf_cls if finetune else hf_mim
  path = _save_unilm(torch, _unilm_state_dict(folder, finetune), tmp_path / "ckpt.pth")
  what = f"unilm checkpoint {path}"
  sd = unilm.load_state_dict(path)
  kw = unilm.infer_model_kwargs(sd, what)
  params = unilm.to_params(sd, kw, what)  # raises on any missing / unexpected key
  hf_params, hf_kw = hf.load(folder)
  assert kw == hf_kw and params.keys() == hf_params.keys()
  images, mask = _images(seed=5), (None if finetune else _mask(seed=6))
  out = _ours(params, kw, images, mask)["logits" if finetune else "mim_logits"]
  np.testing.assert_allclose(out, _hf_out(torch, model, images, mask).logits.numpy(), atol=ATOL)


def test_unilm_errors_name_the_keys(torch, hf_mim, tmp_path, capsys):
  _, folder = hf_mim
  good = _unilm_state_dict(folder, finetune=False)

  def run(sd, name):
    path = _save_unilm(torch, sd, tmp_path / f"{name}.pth")
    return ["--from=unilm", "--to=beit_jax", path, str(tmp_path / f"out_{name}")]

  sd = dict(good)
  del sd["blocks.1.mlp.fc2.bias"], sd["norm.weight"]
  _one_line_error(capsys, run(sd, "missing"), "missing keys blocks.1.mlp.fc2.bias, norm.weight")
  _one_line_error(
    capsys,
    run(dict(good, **{"blocks.0.attn.k_bias": np.zeros(32)}), "unexpected"),
    "unexpected keys blocks.0.attn.k_bias",
  )
  sd = dict(good, **{"blocks.1.mlp.fc1.weight": np.zeros((48, 32), np.float32)})
  _one_line_error(
    capsys, run(sd, "shape"), "blocks.1.mlp.fc1.weight has shape (48, 32), expected (64, 32)"
  )
  sd = dict(good, **{"rel_pos_bias.relative_position_index": _unilm_index((4, 4)).T})
  _one_line_error(capsys, run(sd, "index"), "is not the relative position index of a 4x4")
  # Files of the wrong kind.
  (tmp_path / "text.pth").write_text("hello")
  _one_line_error(
    capsys,
    ["--from=unilm", "--to=beit_jax", str(tmp_path / "text.pth"), str(tmp_path / "o")],
    "cannot be read as a PyTorch checkpoint",
  )
  torch.save({"blocks.input.w": torch.zeros(4, 3, 7, 7)}, str(tmp_path / "dvae.pth"))
  _one_line_error(
    capsys,
    ["--from=unilm", "--to=beit_jax", str(tmp_path / "dvae.pth"), str(tmp_path / "o")],
    "is not a BEiT state dict",
  )
  _one_line_error(
    capsys,
    ["--from=dalle", "--to=beit_jax", str(tmp_path / "missing.pth"), str(tmp_path / "o")],
    "is not a DALL-E encoder/decoder",
  )
  _one_line_error(
    capsys,
    ["--from=unilm", "--to=beit_jax", str(tmp_path / "absent.pth"), str(tmp_path / "o")],
    "is not a file",
  )


def test_abs_pos_embed_resize_matches_torch(torch):
  pos = np.random.default_rng(0).normal(size=(1, 1 + 5 * 5, 4)).astype(np.float32)
  for dst in (3, 8):
    grid = torch.from_numpy(pos[0, 1:].reshape(5, 5, 4)).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(
      grid, size=(dst, dst), mode="bicubic", align_corners=False
    )
    want = want[0].permute(1, 2, 0).reshape(-1, 4).numpy()
    got = relpos.resize_abs_pos_embed(pos, (5, 5), (dst, dst))
    np.testing.assert_allclose(got[0, 1:], want, atol=1e-5)


# ------------------------------------------------------------------ CLI (torch)
def test_cli_end_to_end(torch, transformers, hf_mim, tmp_path, capsys):
  model, folder = hf_mim
  ours_dir, hf_dir = str(tmp_path / "beit_jax"), str(tmp_path / "hf")
  assert main(["--from=hf", "--to=beit_jax", "--rel_pos=per_layer", folder, ours_dir]) == 0
  out = capsys.readouterr().out
  assert f"--config.init_from={ours_dir}" in out
  assert "--config.model.use_shared_rel_pos_bias=False" in out
  params = vit_params.flat(params_lib.read(ours_dir))
  assert "blocks_1/attn/relative_position_bias_table" in params
  assert "rel_pos_bias/relative_position_bias_table" not in params
  assert json.loads((tmp_path / "beit_jax" / "config.json").read_text())["vit"]["use_rel_pos_bias"]

  assert main(["--from=beit_jax", "--to=hf", ours_dir, hf_dir]) == 0
  exported = transformers.BeitForMaskedImageModeling.from_pretrained(hf_dir).eval()
  assert exported.config.use_relative_position_bias
  images, mask = _images(seed=7), _mask(seed=8)
  np.testing.assert_allclose(
    _hf_out(torch, exported, images, mask).logits.numpy(),
    _hf_out(torch, model, images, mask).logits.numpy(),
    atol=ATOL,
  )

  capsys.readouterr()  # transformers' progress bars
  _one_line_error(
    capsys,
    ["--from=beit_jax", "--to=hf", ours_dir, hf_dir],
    "already exists and is not an empty folder",
  )
  _one_line_error(
    capsys,
    ["--from=hf", "--to=beit_jax", "--variant=B/16", folder, str(tmp_path / "o")],
    "--variant=B/16 has width=768 but the weights have 32",
  )


# ------------------------------------------------------------------ DALL-E (torch)
def _dalle_reference(torch, monkeypatch):
  """OpenAI's dall_e Encoder/Decoder (docs/reference.md §3), pickled under its class names.

  Written out from the published architecture so the test needs only torch; the
  'dall_e' case of `test_dalle_parity` checks the same against the real package.
  """
  nn, F = torch.nn, torch.nn.functional

  class Conv2d(nn.Module):
    def __init__(self, n_in, n_out, kw):
      super().__init__()
      self.kw = kw
      self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
      self.b = nn.Parameter(0.1 * torch.randn(n_out))

    def forward(self, x):
      return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)

  class Block(nn.Module):
    kernels = ()

    def __init__(self, n_in, n_out, n_layers):
      super().__init__()
      widths = (n_in,) + (n_out // 4,) * 3 + (n_out,)
      self.post_gain = 1 / n_layers**2
      self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
      self.res_path = nn.Sequential(
        collections.OrderedDict(
          item
          for i, k in enumerate(self.kernels)
          for item in (
            (f"relu_{i + 1}", nn.ReLU()),
            (f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], k)),
          )
        )
      )

    def forward(self, x):
      return self.id_path(x) + self.post_gain * self.res_path(x)

  class EncoderBlock(Block):
    kernels = (3, 3, 3, 1)

  class DecoderBlock(Block):
    kernels = (1, 3, 3, 3)

  def blocks(stem, widths, n_blk, block, resample, out):
    entries = [("input", stem)]
    for g in range(4):
      group = [
        (f"block_{i + 1}", block(widths[g] if i == 0 else widths[g + 1], widths[g + 1], 4 * n_blk))
        for i in range(n_blk)
      ]
      if g < 3:
        group.append(resample)
      entries.append((f"group_{g + 1}", nn.Sequential(collections.OrderedDict(group))))
    entries.append(
      ("output", nn.Sequential(collections.OrderedDict([("relu", nn.ReLU()), ("conv", out)])))
    )
    return nn.Sequential(collections.OrderedDict(entries))

  class Encoder(nn.Module):
    def __init__(self, n_hid, n_blk_per_group, vocab_size):
      super().__init__()
      self.group_count = 4
      w = (n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid)
      self.blocks = blocks(
        Conv2d(3, n_hid, 7),
        w,
        n_blk_per_group,
        EncoderBlock,
        ("pool", nn.MaxPool2d(kernel_size=2)),
        Conv2d(w[-1], vocab_size, 1),
      )

    def forward(self, x):
      return self.blocks(x)

  class Decoder(nn.Module):
    def __init__(self, n_init, n_hid, n_blk_per_group, vocab_size):
      super().__init__()
      self.group_count = 4
      w = (n_init, 8 * n_hid, 4 * n_hid, 2 * n_hid, n_hid)
      self.blocks = blocks(
        Conv2d(vocab_size, n_init, 1),
        w,
        n_blk_per_group,
        DecoderBlock,
        ("upsample", nn.Upsample(scale_factor=2, mode="nearest")),
        Conv2d(n_hid, 6, 1),
      )

    def forward(self, x):
      return self.blocks(x)

  package = {
    "encoder": (Encoder, EncoderBlock),
    "decoder": (Decoder, DecoderBlock),
    "utils": (Conv2d,),
  }
  monkeypatch.setitem(sys.modules, "dall_e", types.ModuleType("dall_e"))
  for module_name, classes in package.items():
    module = types.ModuleType(f"dall_e.{module_name}")
    for cls in classes:
      cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
      setattr(module, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, module.__name__, module)
  return Encoder, Decoder


def _real_dall_e(torch):
  dall_e = pytest.importorskip("dall_e")
  attr = pytest.importorskip("attr")

  def build(cls, **kwargs):
    with attr.validators.disabled():  # the real minimum sizes are not tiny
      module = cls(**kwargs)
    with torch.no_grad():
      for name, p in module.named_parameters():
        if name.endswith(".b"):
          p.normal_(0.0, 0.1)
    return module

  return (lambda **kw: build(dall_e.Encoder, **kw)), (lambda **kw: build(dall_e.Decoder, **kw))


@pytest.mark.parametrize("source", ["reference", "dall_e"])
def test_dalle_parity(torch, tmp_path, monkeypatch, capsys, source):
  torch.manual_seed(0)
  if source == "reference":
    encoder_cls, decoder_cls = _dalle_reference(torch, monkeypatch)
  else:
    encoder_cls, decoder_cls = _real_dall_e(torch)
  fields = dict(n_hid=8, n_blk_per_group=2, vocab_size=VOCAB)
  encoder = encoder_cls(**fields).eval()
  decoder = decoder_cls(n_init=12, **fields).eval()
  src = tmp_path / "dall_e"
  src.mkdir()
  torch.save(encoder, str(src / "encoder.pkl"))
  torch.save(decoder, str(src / "decoder.pkl"))
  out_dir = str(tmp_path / "out")
  assert main(["--from=dalle", "--to=beit_jax", str(src), out_dir]) == 0
  printed = capsys.readouterr().out
  params = params_lib.read(out_dir)
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["tokenizer"] == dict(kind="dvae", n_init=12, **fields)

  model = dvae.DiscreteVAE(n_init=12, **fields)
  images = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
  logits = model.apply({"params": params}, jnp.asarray(images), method=model.encode)
  with torch.no_grad():
    x = torch.from_numpy(np.asarray(dvae.map_pixels(images))).permute(0, 3, 1, 2)
    want_logits = encoder(x).permute(0, 2, 3, 1).numpy()
  assert logits.shape == (2, 2, 2, VOCAB)
  np.testing.assert_allclose(logits, want_logits, atol=ATOL)

  codes = np.random.default_rng(1).random((2, 2, 2, VOCAB)).astype(np.float32)
  out = model.apply({"params": params}, jnp.asarray(codes), method=lambda m, z: m.decoder(z))
  with torch.no_grad():
    want = decoder(torch.from_numpy(codes).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  assert out.shape == (2, 16, 16, 6)
  np.testing.assert_allclose(out, want, atol=ATOL)

  # A MIM run's tokenizer, built from the printed flags, starts from it.
  assert f"--config.tokenizer.init_from={out_dir}" in printed
  flags = printed.split(f"--config.tokenizer.init_from={out_dir}")[1]
  run_config = _with_flags(tiny_config(), flags)
  run_config.tokenizer.init_from = out_dir
  tokenizer, tok_params = tokenizers.load(run_config.tokenizer, out_dir)
  tokens = tokenizer.tokenize(tok_params, jnp.asarray(images))
  np.testing.assert_array_equal(tokens, np.argmax(want_logits, -1))


def test_dalle_files_and_errors(torch, tmp_path, monkeypatch, capsys):
  encoder_cls, decoder_cls = _dalle_reference(torch, monkeypatch)
  src = tmp_path / "dall_e"
  src.mkdir()
  torch.save(encoder_cls(8, 1, VOCAB), str(src / "encoder.pkl"))
  _one_line_error(
    capsys,
    ["--from=dalle", "--to=beit_jax", str(src), str(tmp_path / "o")],
    "pass --encoder_only to convert the encoder alone",
  )
  assert (
    main(
      [
        "--from=dalle",
        "--to=beit_jax",
        "--encoder_only",
        str(src / "encoder.pkl"),
        str(tmp_path / "enc"),
      ]
    )
    == 0
  )
  assert set(params_lib.read(str(tmp_path / "enc"))) == {"encoder"}
  # A plain state_dict() of the module reads the same.
  torch.save(decoder_cls(8, 8, 1, VOCAB).state_dict(), str(src / "decoder.pkl"))
  params, fields = dalle.load(str(src))
  assert set(params) == {"encoder", "decoder"} and fields["n_init"] == 8
  _one_line_error(
    capsys,
    [
      "--from=dalle",
      "--to=beit_jax",
      "--encoder_only",
      str(src / "decoder.pkl"),
      str(tmp_path / "o"),
    ],
    "is a DALL-E decoder; give the encoder",
  )
  torch.save(decoder_cls(8, 16, 1, VOCAB), str(src / "decoder.pkl"))
  _one_line_error(
    capsys,
    ["--from=dalle", "--to=beit_jax", str(src), str(tmp_path / "o")],
    "n_hid=16 but the encoder has 8",
  )
  sd = encoder_cls(8, 1, VOCAB).state_dict()
  sd["blocks.group_2.block_1.res_path.conv_2.w"] = torch.zeros(4, 4, 5, 5)
  torch.save(sd, str(src / "encoder.pkl"))
  _one_line_error(
    capsys,
    ["--from=dalle", "--to=beit_jax", "--encoder_only", str(src), str(tmp_path / "o")],
    "blocks.group_2.block_1.res_path.conv_2.w has shape (4, 4, 5, 5), expected (4, 4, 3, 3)",
  )
  # A BEiT checkpoint is not a DALL-E file, and a DALL-E pickle is not a unilm one.
  torch.save(decoder_cls(8, 8, 1, VOCAB), str(src / "decoder.pkl"))
  _one_line_error(
    capsys,
    ["--from=unilm", "--to=beit_jax", str(src / "decoder.pkl"), str(tmp_path / "o")],
    "cannot be read as a PyTorch checkpoint",
  )
  torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}}, str(src / "encoder.pkl"))
  _one_line_error(
    capsys,
    ["--from=dalle", "--to=beit_jax", "--encoder_only", str(src), str(tmp_path / "o")],
    "is not a DALL-E encoder/decoder",
  )
