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

from beit_jax.training import checkpoint
from beit_jax import tokenizers
from beit_jax import visualize
from beit_jax.training import visuals
from beit_jax.data import views
from beit_jax.errors import ConfigError
from beit_jax.models import dvae
from beit_jax.training import mim_objective
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
  shapes = jax.eval_shape(
    lambda: model.init(
      {"params": jax.random.key(0)}, jnp.zeros((1, 8, 8, 3)), temperature=1.0, train=False
    )
  )["params"]
  rng = np.random.default_rng(3)
  return jax.tree.map(
    lambda s: (
      np.zeros(s.shape, np.float32)
      if len(s.shape) == 1
      else rng.normal(0, np.prod(s.shape[:3]) ** -0.5, s.shape).astype(np.float32)
    ),
    shapes,
  )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run's workdir without training: random ViT params, random dVAE in tokenizer/."""
  config = tiny_config()
  root = tmp_path_factory.mktemp("run")
  model = mim_objective.make_model(config, train=False)
  params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))["params"]
  # Zero init leaves the relative position bias out of the test; make it matter.
  params["rel_pos_bias"]["relative_position_bias_table"] = jax.random.normal(
    jax.random.key(2), params["rel_pos_bias"]["relative_position_bias_table"].shape
  )
  _save(root, params, config)
  tok = tokenizers.build(config.tokenizer).model
  tok_params = _dvae_params(tok)
  _save(root / "tokenizer", tok_params, config)
  return dict(path=root, config=config, model=model, params=params, tok=tok, tok_params=tok_params)


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


def _shape(rows, cols):
  """A labelled attention grid's / token picture's shape: the label margins, then the cells."""
  top, left = visuals.label_margins(rows, cols, CELL + PAD)
  return (top + len(rows or [None]) * (CELL + PAD), left + len(cols) * (CELL + PAD), 3)


def _cell(picture, row, col, grid):
  """Cell (row, col) of a grid of `grid` = (rows, cols) cells below and right of its labels."""
  top = picture.shape[0] - grid[0] * (CELL + PAD)
  left = picture.shape[1] - grid[1] * (CELL + PAD)
  return picture[
    top + row * (CELL + PAD) : top + row * (CELL + PAD) + CELL,
    left + col * (CELL + PAD) : left + col * (CELL + PAD) + CELL,
  ]


def _has_text(region):
  """Dark pixels (a label's strokes) in a part of a white margin."""
  return (np.asarray(region) < 128).any()


def test_cli_writes_one_grid_per_image_and_reference_patch(run_dir, image_dir, tmp_path):
  out = tmp_path / "out"
  argv = [
    "visualize",
    f"--checkpoint={run_dir['path']}",
    f"--tokenizer={run_dir['path']}",
    f"--images={image_dir}",
    f"--out={out}",
    "--layers=0,-1",
    "--heads=1",
    "--ref_patches=center;0,0",
  ]
  flags.FLAGS(argv)
  try:
    visualize.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  names = sorted(p.name for p in out.iterdir())
  assert names == sorted(
    f"{stem}_{kind}.png"
    for stem in ("square", "wide")
    for kind in ("attention_r2c2", "attention_r0c0", "tokens")
  )
  # Rows: head 1 and the mean over heads; columns: layers 0 and 1.
  attention = _png(out / "wide_attention_r0c0.png")
  assert attention.shape == _shape(["head 1", "mean"], ["layer 0", "layer 1"])
  # Image, token map, reconstruction.
  tokens = _png(out / "wide_tokens.png")
  assert tokens.shape == _shape(None, ["image", "tokens", "dVAE recon."])
  # The labels are drawn: text in the left margin beside each row, above each column.
  top, left = visuals.label_margins(["head 1", "mean"], ["layer 0", "layer 1"], CELL + PAD)
  assert top > 0 and left > 0
  for i in range(2):
    assert _has_text(attention[top + i * (CELL + PAD) : top + (i + 1) * (CELL + PAD), :left])
    assert _has_text(attention[:top, left + i * (CELL + PAD) : left + (i + 1) * (CELL + PAD)])
  assert not _has_text(attention[top:, :left][-PAD:])  # the last row's gap: blank
  top = tokens.shape[0] - (CELL + PAD)
  assert top > 0 and tokens.shape[1] == 3 * (CELL + PAD)  # column labels only
  for j in range(3):
    assert _has_text(tokens[:top, j * (CELL + PAD) : (j + 1) * (CELL + PAD)])


def test_attention_cells_equal_a_manual_computation(run_dir, image_dir, tmp_path):
  visualize.run(
    checkpoint_dir=str(run_dir["path"]),
    images=str(image_dir / "square.png"),
    out=str(tmp_path),
    layers="1",
    heads="1",
    ref_patches="1,2",
  )
  picture = _png(tmp_path / "square_attention_r1c2.png")
  assert picture.shape == _shape(["head 1", "mean"], ["layer 1"])

  image = np.asarray(Image.open(image_dir / "square.png"), np.float32) / 255
  normalized = (image - np.array(views.IMAGENET_MEAN)) / np.array(views.IMAGENET_STD)
  out = run_dir["model"].apply(
    {"params": run_dir["params"]}, jnp.asarray(normalized[None], jnp.float32), return_attention=True
  )
  ref = 1 * 4 + 2
  rows = np.asarray(out["attention"][1])[0, :, 1 + ref]  # [heads, N+1]: layer 1
  np.testing.assert_allclose(rows.sum(-1), 1.0, rtol=1e-5)
  gray = np.repeat((image @ np.array([0.299, 0.587, 0.114]))[..., None], 3, -1)
  gray = np.kron(gray, np.ones((4, 4, 1)))  # [128, 128, 3]
  outline = np.zeros((CELL, CELL), bool)
  outline[PATCH : 2 * PATCH, 2 * PATCH : 3 * PATCH] = True
  outline[PATCH + 4 : 2 * PATCH - 4, 2 * PATCH + 4 : 3 * PATCH - 4] = False  # 4 = 32 // 8 wide
  for grid_row, att in ((0, rows[1, 1:]), (1, rows[:, 1:].mean(0))):  # head 1, mean
    heat = np.kron((att / att.max()).reshape(4, 4), np.ones((PATCH, PATCH)))[..., None]
    want = 0.4 * gray + 0.6 * heat * np.array([1.0, 0.0, 0.0])
    want = np.where(outline[..., None], np.array([0.0, 1.0, 0.0]), want)
    want = np.round(np.clip(want, 0, 1) * 255)
    np.testing.assert_allclose(_cell(picture, grid_row, 0, (2, 1)), want, atol=1)
  assert not np.allclose(rows[0], rows[1], atol=1e-3)  # the two rows test different things


def test_token_map_has_one_colour_per_token_id(run_dir, image_dir, tmp_path):
  visualize.run(
    tokenizer_dir=str(run_dir["path"] / "tokenizer"),
    images=str(image_dir / "square.png"),
    out=str(tmp_path),
  )
  picture = _png(tmp_path / "square_tokens.png")
  image = np.asarray(Image.open(image_dir / "square.png"), np.float32)[None] / 255
  tok, params = run_dir["tok"], run_dir["tok_params"]
  tokens = np.asarray(dvae.tokenize(params, jnp.asarray(image), model=tok))[0]  # [4, 4]
  recon = np.asarray(
    tok.apply({"params": params}, jnp.asarray(tokens[None]), method=tok.decode_tokens)
  )[0]
  np.testing.assert_allclose(
    _cell(picture, 0, 0, (1, 3)), np.kron(image[0] * 255, np.ones((4, 4, 1))), atol=1
  )
  np.testing.assert_allclose(
    _cell(picture, 0, 2, (1, 3)), np.round(np.kron(recon, np.ones((4, 4, 1))) * 255), atol=1
  )
  token_cells = _cell(picture, 0, 1, (1, 3)).reshape(4, PATCH, 4, PATCH, 3).transpose(0, 2, 1, 3, 4)
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
  (vit_dir / "config.json").write_text(
    json.dumps(
      {
        "converted_from": "x.pth",
        "vit": dict(
          patch_size=8,
          width=32,
          depth=2,
          num_heads=2,
          mlp_dim=64,
          image_size=32,
          vocab_size=64,
          num_classes=0,
          use_abs_pos_emb=False,
          use_shared_rel_pos_bias=True,
          use_rel_pos_bias=False,
          layer_scale_init=0.1,
        ),
      }
    )
  )
  checkpoint.save_params(
    str(tok_dir),
    {"encoder": run_dir["tok_params"]["encoder"]},
    {
      "converted_from": "encoder.pkl",
      "tokenizer": dict(kind="dvae", vocab_size=64, n_hid=8, n_blk_per_group=1, n_init=None),
    },
  )
  images = str(image_dir / "square.png")
  with pytest.raises(ConfigError, match="sets no input.tokenizer_image_size; pass --image_size"):
    visualize.run(tokenizer_dir=str(tok_dir), images=images, out=str(tmp_path / "out"))
  visualize.run(
    checkpoint_dir=str(vit_dir),
    tokenizer_dir=str(tok_dir),
    images=images,
    out=str(tmp_path / "out"),
    image_size=32,
    heads="0",
  )
  assert _png(tmp_path / "out" / "square_attention_r2c2.png").shape == _shape(
    ["head 0", "mean"], ["layer 0", "layer 1"]
  )
  # Image and token map: no decoder, no reconstruction.
  assert _png(tmp_path / "out" / "square_tokens.png").shape == _shape(None, ["image", "tokens"])


@pytest.mark.parametrize("tile", [32, 128])
def test_label_grid_writes_each_label_into_a_margin(tile):
  rows = [np.zeros((3, tile, tile, 3), np.float32) + v for v in (0.2, 0.5, 0.8)]
  labels, columns = ["input", "masked", "dVAE recon."], ["a", "b", "layer 11"]
  picture = visuals.image_grid(rows, row_labels=labels, col_labels=columns)
  cell = tile + PAD
  top, left = visuals.label_margins(labels, columns, cell)
  assert top > 0 and left > 0
  assert picture.shape == (top + 3 * cell, left + 3 * cell, 3)
  np.testing.assert_array_equal(picture[top:, left:], visuals.image_grid(rows))
  for i in range(3):
    assert _has_text(picture[top + i * cell : top + (i + 1) * cell, :left]), labels[i]
    assert _has_text(picture[:top, left + i * cell : left + (i + 1) * cell]), columns[i]
  assert (picture[:top, :left] == 1).all()  # the corner stays white
  # Text scales with the cells: longer labels, wider margin; bigger cells, bigger text.
  assert (
    visuals.label_margins(["dVAE recon."], None, cell)[1]
    > visuals.label_margins(["input"], None, cell)[1]
  )
  assert visuals.label_margins(None, ["x"], 258)[0] > visuals.label_margins(None, ["x"], 34)[0]
  # No labels, no margin.
  assert visuals.image_grid(rows).shape == (3 * cell, 3 * cell, 3)


def test_label_counts_must_match_the_grid():
  rows = [np.zeros((4, 8, 8, 3), np.float32)] * 3
  with pytest.raises(ValueError, match=r"2 row labels \['input', 'masked'\] for 3 rows"):
    visuals.image_grid(rows, row_labels=["input", "masked"])
  with pytest.raises(ValueError, match="5 column labels .* for 4 columns"):
    visuals.image_grid(rows, col_labels=list("abcde"))
  with pytest.raises(ValueError, match=r"4 row labels .* for a grid of 3 rows \(30 pixels"):
    visuals.label_grid(np.ones((30, 40, 3)), list("abcd"), row_height=10, col_width=10)
  with pytest.raises(ValueError, match="1 column labels .* grid of 4 columns"):
    visuals.label_grid(np.ones((30, 40, 3)), col_labels=["a"], row_height=10, col_width=10)


class _Writer:
  """The TensorBoard writer's one method the pictures use."""

  def __init__(self):
    self.images = {}

  def write_images(self, step, images):
    self.images.update(images)


def test_segmentation_picture_labels_its_columns(tmp_path):
  rng = np.random.default_rng(0)
  samples = [
    (
      rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
      rng.integers(0, 3, (16, 16)),
      rng.integers(0, 3, (16, 16)),
    )
    for _ in range(2)
  ]
  writer = _Writer()
  visuals.write_segmentation_images(tmp_path, writer, 7, samples, num_classes=3)
  picture = _png(tmp_path / "segmentation_0000007.png")
  np.testing.assert_array_equal(writer.images["segmentation"][0], picture)  # same in TB
  cell = (16 + PAD) * 16  # enlarged to 256 pixels
  top, _ = visuals.label_margins(None, ["image", "prediction", "truth"], cell)
  assert picture.shape == (top + 2 * cell, 3 * cell, 3)
  for j in range(3):
    assert _has_text(picture[:top, j * cell : (j + 1) * cell])


def _row_labels_drawn(picture, rows, cell):
  """Text in the left margin beside each of `rows` rows of `cell` pixels (no top margin)."""
  left = picture.shape[1] - (picture.shape[1] // cell) * cell
  assert left > 0 and picture.shape[0] == rows * cell
  return all(_has_text(picture[i * cell : (i + 1) * cell, :left]) for i in range(rows))


def test_mim_picture_labels_its_five_rows(run_dir, tmp_path):
  config = run_dir["config"]
  tokenizer = tokenizers.build(config.tokenizer)
  view_specs = tokenizers.pretrain_views(config)
  rng = np.random.default_rng(1)
  pixels = rng.uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
  batch = {
    "image": view_specs["image"].to_model(pixels),
    "tokenizer_image": view_specs["tokenizer_image"].to_model(pixels),
    "mask": rng.uniform(size=(8, 16)) < 0.4,
  }
  writer = _Writer()
  visuals.write_mim_images(
    tmp_path,
    writer,
    3,
    batch,
    model=run_dir["model"],
    params=run_dir["params"],
    tokenizer=tokenizer,
    tok_params=run_dir["tok_params"],
    vit_view=view_specs["image"],
  )
  picture = _png(tmp_path / "mim_0000003.png")
  np.testing.assert_array_equal(writer.images["mim"][0], picture)
  labels = ["input", "masked", "dVAE recon.", "prediction", "attention"]
  _, left = visuals.label_margins(labels, None, 32 + PAD)
  assert picture.shape == (5 * (32 + PAD), left + 8 * (32 + PAD), 3)
  assert _row_labels_drawn(picture, 5, 32 + PAD)


def test_tokenizer_picture_labels_input_and_reconstruction(run_dir, tmp_path):
  config = run_dir["config"]
  pixels = np.random.default_rng(4).uniform(0, 1, (3, 32, 32, 3)).astype(np.float32)
  writer = _Writer()
  visuals.write_tokenizer_images(
    tmp_path,
    writer,
    2,
    tokenizers.view(config).to_model(pixels),
    tokenizer=tokenizers.build(config.tokenizer),
    params=run_dir["tok_params"],
  )
  picture = _png(tmp_path / "dvae_reconstructions_0000002.png")
  np.testing.assert_array_equal(writer.images["dvae_reconstructions"][0], picture)
  _, left = visuals.label_margins(["input", "dVAE recon."], None, 32 + PAD)
  assert picture.shape == (2 * (32 + PAD), left + 3 * (32 + PAD), 3)
  assert _row_labels_drawn(picture, 2, 32 + PAD)


class _BrightnessTokenizer:
  """A stand-in tokenizer: a 2x2 grid of codes, the patch's mean brightness in 4 levels."""

  kind = "fake"

  def tokenize(self, params, images):
    del params
    patches = np.asarray(images).reshape(len(images), 2, 8, 2, 8, 3).mean((2, 4, 5))
    return np.clip((patches + 1) * 2, 0, 3).astype(np.int32)

  def vocab_size(self, params):
    del params
    return 4


def test_code_pictures_label_their_rows(tmp_path):
  levels = np.linspace(-0.9, 0.9, 6)[:, None, None, None]  # codes 0, 0, 1, 2, 3, 3
  noise = np.random.default_rng(2).uniform(-0.05, 0.05, (6, 16, 16, 3))
  images = (levels + noise).astype(np.float32)
  writer = _Writer()
  visuals.write_code_images(
    tmp_path,
    writer,
    5,
    images,
    tokenizer=_BrightnessTokenizer(),
    params=None,
    view=views.View(16, normalization="signed"),
    num_images=4,
    num_codes=3,
    per_code=4,
  )
  maps = _png(tmp_path / "fake_token_maps_0000005.png")
  np.testing.assert_array_equal(writer.images["fake_token_maps"][0], maps)
  assert _row_labels_drawn(maps, 2, 16 + PAD)  # input, codes
  codes = _png(tmp_path / "fake_code_patches_0000005.png")
  cell = (8 + PAD) * 4  # 8-pixel patches enlarged 4x
  assert codes.shape[0] == 3 * cell and _row_labels_drawn(codes, 3, cell)


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


@pytest.mark.parametrize(
  "kwargs,message",
  [
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
    (
      dict(checkpoint_dir="{run}", ref_patches="1,1;4,0"),
      r"patch \(4,0\) is outside the 4x4 patch grid",
    ),
    (dict(checkpoint_dir="{run}", ref_patches="middle"), "'middle' is not 'center' or 'row,col'"),
    (dict(checkpoint_dir="{run}", image_size=64), "--image_size=64, but the ViT"),
    (dict(checkpoint_dir="{tmp}/deeper"), "parameters do not fit the model"),
    (dict(tokenizer_dir="{run}", image_size=36), "--image_size=36: the dVAE needs a multiple of 8"),
    (dict(), "pass --checkpoint"),
  ],
)
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
  cmd = [
    sys.executable,
    "-m",
    "beit_jax.visualize",
    f"--checkpoint={tmp_path}/nope",
    "--images=embedded",
    f"--out={tmp_path}/out",
  ]
  proc = subprocess.run(
    cmd,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
    f"beit_jax: error: --checkpoint={tmp_path}/nope does not exist"
  )
  assert "Traceback" not in proc.stderr
