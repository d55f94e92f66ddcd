"""`python -m beit_jax.visualize`: files and grid sizes, pixels against a manual computation."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from PIL import Image

from beit_jax import checkpoint
from beit_jax import tokenizers
from beit_jax import visualize
from beit_jax import visuals
from beit_jax.data import views
from beit_jax.errors import ConfigError
from beit_jax.models import dvae
from beit_jax import mim_objective
from tests.tiny_config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELL = 32 * 4  # the tiny config's 32-pixel images, enlarged 4x to reach 128 pixels
PAD = 2  # visuals.image_grid's white gap after every cell
PATCH = CELL // 4  # 4x4 patches of 8 pixels, enlarged


def _save(path, params, config):
  checkpoint.save_params(str(path), params)
  (path / "config.json").write_text(config.to_json_best_effort())


def _dvae_params(model):
  """Random dVAE params like its init (N(0, 1/fan_in) kernels, zero biases).

  Made with NumPy: compiling the dVAE's own init takes half a minute on CPU.
  """
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0)}, jnp.zeros((1, 8, 8, 3)), temperature=1.0,
      train=False))["params"]
  rng = np.random.default_rng(3)
  return jax.tree.map(lambda s: np.zeros(s.shape, np.float32) if len(s.shape) == 1 else
                      rng.normal(0, np.prod(s.shape[:3]) ** -0.5, s.shape).astype(np.float32),
                      shapes)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run's workdir without training: random ViT params, random dVAE in tokenizer/."""
  config = tiny_config()
  root = tmp_path_factory.mktemp("run")
  model = mim_objective.make_model(config, train=False)
  params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))["params"]
  # Zero init leaves the relative position bias out of the test; make it matter.
  params["rel_pos_bias"]["relative_position_bias_table"] = jax.random.normal(
      jax.random.key(2), params["rel_pos_bias"]["relative_position_bias_table"].shape)
  _save(root, params, config)
  tok = tokenizers.build(config.tokenizer).model
  tok_params = _dvae_params(tok)
  _save(root / "tokenizer", tok_params, config)
  return dict(path=root, config=config, model=model, params=params, tok=tok,
              tok_params=tok_params)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
  """A 32x32 photo-like image (smooth colours + noise) and a 48x32 one."""
  folder = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:32, 0:32] / 31.0
  smooth = np.stack([x, y, 1 - x * y], -1) * 200 + rng.integers(0, 55, (32, 32, 3))
  Image.fromarray(smooth.astype(np.uint8)).save(folder / "square.png")
  Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(folder / "wide.png")
  (folder / "notes.txt").write_text("not an image")
  return folder


def _png(path):
  return np.asarray(Image.open(path), np.int32)


def _cell(picture, row, col):
  return picture[row * (CELL + PAD):row * (CELL + PAD) + CELL,
                 col * (CELL + PAD):col * (CELL + PAD) + CELL]


def test_cli_writes_one_grid_per_image_and_reference_patch(run_dir, image_dir, tmp_path):
  out = tmp_path / "out"
  argv = ["visualize", f"--checkpoint={run_dir['path']}", f"--tokenizer={run_dir['path']}",
          f"--images={image_dir}", f"--out={out}", "--layers=0,-1", "--heads=1",
          "--ref_patches=center;0,0"]
  flags.FLAGS(argv)
  try:
    visualize.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  names = sorted(p.name for p in out.iterdir())
  assert names == sorted(f"{stem}_{kind}.png" for stem in ("square", "wide") for kind in
                         ("attention_r2c2", "attention_r0c0", "tokens"))
  # Rows: head 1 and the mean over heads; columns: layers 0 and 1.
  assert _png(out / "wide_attention_r0c0.png").shape == (2 * (CELL + PAD), 2 * (CELL + PAD), 3)
  # Image, token map, reconstruction.
  assert _png(out / "wide_tokens.png").shape == (CELL + PAD, 3 * (CELL + PAD), 3)


def test_attention_cells_equal_a_manual_computation(run_dir, image_dir, tmp_path):
  visualize.run(checkpoint_dir=str(run_dir["path"]), images=str(image_dir / "square.png"),
                out=str(tmp_path), layers="1", heads="1", ref_patches="1,2")
  picture = _png(tmp_path / "square_attention_r1c2.png")
  assert picture.shape == (2 * (CELL + PAD), CELL + PAD, 3)

  image = np.asarray(Image.open(image_dir / "square.png"), np.float32) / 255
  normalized = ((image - np.array(views.IMAGENET_MEAN))
                / np.array(views.IMAGENET_STD))
  out = run_dir["model"].apply({"params": run_dir["params"]},
                               jnp.asarray(normalized[None], jnp.float32), return_attention=True)
  ref = 1 * 4 + 2
  rows = np.asarray(out["attention"][1])[0, :, 1 + ref]  # [heads, N+1]: layer 1
  np.testing.assert_allclose(rows.sum(-1), 1.0, rtol=1e-5)
  gray = np.repeat((image @ np.array([0.299, 0.587, 0.114]))[..., None], 3, -1)
  gray = np.kron(gray, np.ones((4, 4, 1)))  # [128, 128, 3]
  outline = np.zeros((CELL, CELL), bool)
  outline[PATCH:2 * PATCH, 2 * PATCH:3 * PATCH] = True
  outline[PATCH + 4:2 * PATCH - 4, 2 * PATCH + 4:3 * PATCH - 4] = False  # 4 = 32 // 8 wide
  for grid_row, att in ((0, rows[1, 1:]), (1, rows[:, 1:].mean(0))):  # head 1, mean
    heat = np.kron((att / att.max()).reshape(4, 4), np.ones((PATCH, PATCH)))[..., None]
    want = 0.4 * gray + 0.6 * heat * np.array([1.0, 0.0, 0.0])
    want = np.where(outline[..., None], np.array([0.0, 1.0, 0.0]), want)
    want = np.round(np.clip(want, 0, 1) * 255)
    np.testing.assert_allclose(_cell(picture, grid_row, 0), want, atol=1)
  assert not np.allclose(rows[0], rows[1], atol=1e-3)  # the two rows test different things


def test_token_map_has_one_colour_per_token_id(run_dir, image_dir, tmp_path):
  visualize.run(tokenizer_dir=str(run_dir["path"] / "tokenizer"),
                images=str(image_dir / "square.png"), out=str(tmp_path))
  picture = _png(tmp_path / "square_tokens.png")
  image = np.asarray(Image.open(image_dir / "square.png"), np.float32)[None] / 255
  tok, params = run_dir["tok"], run_dir["tok_params"]
  tokens = np.asarray(dvae.tokenize(params, jnp.asarray(image), model=tok))[0]  # [4, 4]
  recon = np.asarray(tok.apply({"params": params}, jnp.asarray(tokens[None]),
                               method=tok.decode_tokens))[0]
  np.testing.assert_allclose(_cell(picture, 0, 0), np.kron(image[0] * 255, np.ones((4, 4, 1))),
                             atol=1)
  np.testing.assert_allclose(_cell(picture, 0, 2),
                             np.round(np.kron(recon, np.ones((4, 4, 1))) * 255), atol=1)
  token_cells = _cell(picture, 0, 1).reshape(4, PATCH, 4, PATCH, 3).transpose(0, 2, 1, 3, 4)
  assert (token_cells == token_cells[:, :, :1, :1]).all()  # one flat colour per token
  colours = token_cells[:, :, 0, 0].reshape(16, 3)
  ids = tokens.reshape(16)
  assert len(set(ids.tolist())) > 1
  for i in range(16):
    for j in range(16):
      assert (ids[i] == ids[j]) == (colours[i] == colours[j]).all(), (i, j, ids)


def test_converted_checkpoints(run_dir, image_dir, tmp_path):
  """A converter's config.json: ViT fields under 'vit'; a DALL-E encoder without decoder."""
  vit_dir, tok_dir = tmp_path / "vit", tmp_path / "dall_e"
  vit_dir.mkdir()
  (vit_dir / "checkpoints").symlink_to(run_dir["path"] / "checkpoints")
  (vit_dir / "config.json").write_text(json.dumps({"converted_from": "x.pth", "vit": dict(
      patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, image_size=32, vocab_size=64,
      num_classes=0, use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
      use_rel_pos_bias=False, layer_scale_init=0.1)}))
  checkpoint.save_params(str(tok_dir), {"encoder": run_dir["tok_params"]["encoder"]},
                         {"converted_from": "encoder.pkl", "tokenizer": dict(
                             kind="dvae", vocab_size=64, n_hid=8, n_blk_per_group=1,
                             n_init=None)})
  images = str(image_dir / "square.png")
  with pytest.raises(ConfigError, match="sets no input.tokenizer_image_size; pass --image_size"):
    visualize.run(tokenizer_dir=str(tok_dir), images=images, out=str(tmp_path / "out"))
  visualize.run(checkpoint_dir=str(vit_dir), tokenizer_dir=str(tok_dir), images=images,
                out=str(tmp_path / "out"), image_size=32, heads="0")
  assert _png(tmp_path / "out" / "square_attention_r2c2.png").shape == (
      2 * (CELL + PAD), 2 * (CELL + PAD), 3)
  # Image and token map: no decoder, no reconstruction.
  assert _png(tmp_path / "out" / "square_tokens.png").shape == (CELL + PAD, 2 * (CELL + PAD), 3)


def test_token_colors_are_distinct_png_colours_for_a_dalle_vocabulary():
  ids = np.arange(8192)
  colours = visuals.to_uint8(visuals.token_colors(ids, 8192))  # [8192, 3]
  assert len(np.unique(colours, axis=0)) == 8192
  again = visuals.to_uint8(visuals.token_colors(ids[::-1].reshape(64, 128), 8192))
  np.testing.assert_array_equal(again.reshape(8192, 3)[::-1], colours)


def test_center_crop_keeps_the_middle_of_the_longer_side():
  pixels = np.repeat(np.arange(48, dtype=np.uint8)[None, :, None], 32, 0).repeat(3, 2)
  crop = visualize.center_crop_resize(pixels, 32)  # shorter side already 32: no resize
  np.testing.assert_array_equal(crop[0, :, 0] * 255, np.arange(8, 40))


@pytest.mark.parametrize("kwargs,message", [
    (dict(checkpoint_dir="{tmp}/MISSING"), r"--checkpoint=\S*MISSING does not exist"),
    (dict(checkpoint_dir="{images}"), "has no config.json"),
    (dict(checkpoint_dir="{tmp}/no_params"), "no beit-jax checkpoint found"),
    (dict(checkpoint_dir="{run}", images="{tmp}/empty"), "holds no image files"),
    (dict(checkpoint_dir="{run}", images="{images}/*.jpg"), "matches no files as a glob"),
    (dict(checkpoint_dir="{run}", images="{images}/notes.txt"), "cannot read .*notes.txt"),
    (dict(checkpoint_dir="{run}", layers="2"), r"--layers='2': block indices must be in 0\.\.1"),
    (dict(checkpoint_dir="{run}", layers="-3"), r"--layers='-3'"),
    (dict(checkpoint_dir="{run}", layers="one"), "comma-separated integers"),
    (dict(checkpoint_dir="{run}", heads="2"), r"--heads='2': head indices must be in 0\.\.1"),
    (dict(checkpoint_dir="{run}", ref_patches="1,1;4,0"),
     r"patch \(4,0\) is outside the 4x4 patch grid"),
    (dict(checkpoint_dir="{run}", ref_patches="middle"), "'middle' is not 'center' or 'row,col'"),
    (dict(checkpoint_dir="{run}", image_size=64), "--image_size=64, but the ViT"),
    (dict(checkpoint_dir="{tmp}/deeper"), "parameters do not fit the model"),
    (dict(tokenizer_dir="{run}", image_size=36), "--image_size=36: the dVAE needs a multiple of 8"),
    (dict(), "pass --checkpoint"),
])
def test_bad_arguments_are_config_errors(run_dir, image_dir, tmp_path, kwargs, message):
  (tmp_path / "empty").mkdir()
  (tmp_path / "no_params").mkdir()
  (tmp_path / "no_params" / "config.json").write_text(run_dir["config"].to_json_best_effort())
  if kwargs.get("checkpoint_dir") == "{tmp}/deeper":  # config.json of 3 blocks, params of 2
    deeper = run_dir["config"].copy_and_resolve_references()
    deeper.model.depth = 3
    (tmp_path / "deeper").mkdir()
    (tmp_path / "deeper" / "checkpoints").symlink_to(run_dir["path"] / "checkpoints")
    (tmp_path / "deeper" / "config.json").write_text(deeper.to_json_best_effort())
  places = dict(tmp=tmp_path, images=image_dir, run=run_dir["path"])
  args = dict(images=str(image_dir), out=str(tmp_path / "out"))
  args.update({k: v.format(**places) if isinstance(v, str) else v for k, v in kwargs.items()})
  with pytest.raises(ConfigError, match=message):
    visualize.run(**args)


def test_cli_error_is_one_line_and_exit_code_1(tmp_path):
  cmd = [sys.executable, "-m", "beit_jax.visualize", f"--checkpoint={tmp_path}/nope",
         "--images=embedded", f"--out={tmp_path}/out"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f"beit_jax: error: --checkpoint={tmp_path}/nope does not exist")
  assert "Traceback" not in proc.stderr
