"""The VQ-KD tokenizer kind (tokenizers/vqkd.py) and its trainer (trainers/vqkd.py)."""

import copy
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from beit_jax.training import checkpoint
from beit_jax import main
from beit_jax import params as params_lib
from beit_jax.training import runner
from beit_jax.training import sharding
from beit_jax import tokenizers
from beit_jax import trainers
from beit_jax.params import vit as vit_params
from beit_jax.data.views import View
from beit_jax.errors import ConfigError
from beit_jax.models import vit
from beit_jax.models import vqkd as vqkd_model
from beit_jax.trainers import vqkd
from configs import common
from configs import finetune_tiny_local
from configs import vqkd_clip_base, vqkd_dino_base, vqkd_tiny_local
from tests.tiny_vqkd_config import CODE_DIM, CODES, GRID, PATCH, SIZE, TEACHER_DIM
from tests.tiny_vqkd_config import tiny_vqkd_config


def _one_line(excinfo, *fragments):
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  for fragment in fragments:
    assert fragment in msg, msg


def _zeros(shapes):
  """Zero numpy params of a ShapeDtypeStruct tree (no compilation)."""
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _images(n=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)), jnp.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A VQ-KD tokenizer's params saved as a beit-jax checkpoint (as a run leaves them)."""
  config = tiny_vqkd_config()
  tokenizer = tokenizers.build(config.tokenizer)
  params = jax.jit(lambda r: tokenizer.init(r, SIZE))(jax.random.key(0))
  path = str(tmp_path_factory.mktemp("vqkd") / "tok")
  checkpoint.save_params(path, params)
  return config, tokenizer, params, path


def test_registry_entry_round_trip(saved):
  config, tokenizer, params, path = saved
  assert set(params) == {"params", "codebook"}
  assert tokenizers.view(config) == View(SIZE, "bicubic", "signed")
  assert tokenizers.grid(config) == GRID
  assert tokenizers.entry("vqkd").trainer == "vqkd" and tokenizer.decode(params, None) is None
  loaded_tok, loaded = tokenizers.load(config.tokenizer, path)
  assert loaded_tok.vocab_size(loaded) == CODES
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)
  images = _images()
  tokens = jax.jit(loaded_tok.tokenize)(loaded, images)
  assert tokens.shape == (3, GRID, GRID) and tokens.dtype == jnp.int32
  assert int(tokens.min()) >= 0 and int(tokens.max()) < CODES
  # The same as the model's own lookup.
  want = vqkd_model.tokenize(params, images, model=tokenizer.model.clone(image_size=SIZE))
  np.testing.assert_array_equal(tokens, want)
  # Another image size than the weights': one line naming the field.
  with pytest.raises(ConfigError) as e:
    loaded_tok.tokenize(loaded, jnp.zeros((1, 2 * SIZE, 2 * SIZE, 3)))
  _one_line(e, "input.tokenizer_image_size=64", f"{SIZE}x{SIZE}")


@pytest.mark.parametrize(
  "field,value",
  [
    ("code_dim", 2 * CODE_DIM),
    ("teacher_dim", 2 * TEACHER_DIM),
    ("encoder.width", 48),
    ("decoder.depth", 2),
    ("patch_size", 4),
  ],
)
def test_a_size_the_checkpoint_does_not_have_is_one_line(saved, field, value):
  config, _, _, path = saved
  tok = config.tokenizer.copy_and_resolve_references()
  *parents, key = field.split(".")
  node = tok
  for p in parents:
    node = node[p]
  want = node[key]
  node[key] = value
  with pytest.raises(ConfigError) as e:
    tokenizers.load(tok, path)
  _one_line(e, f"tokenizer.{field}={value}", f"has {want}")


def test_a_kind_the_checkpoint_is_not_is_one_line(saved, tmp_path):
  config, _, _, path = saved
  from tests.tiny_config import tiny_config  # pylint: disable=g-import-not-at-top

  dvae_tok = tiny_config().tokenizer
  dvae_tok.vocab_size = CODES
  with pytest.raises(ConfigError) as e:
    tokenizers.load(dvae_tok, path)
  _one_line(e, "tokenizer.kind='dvae'", "VQ-KD", "tokenizer.kind=vqkd")
  # A dVAE checkpoint read as VQ-KD.
  dvae = tokenizers.build(dvae_tok)
  dvae_params = _zeros(jax.eval_shape(lambda r: dvae.init(r, SIZE), jax.random.key(0)))
  checkpoint.save_params(str(tmp_path / "dvae"), dvae_params)
  with pytest.raises(ConfigError) as e:
    tokenizers.load(config.tokenizer, str(tmp_path / "dvae"))
  _one_line(e, "tokenizer.kind='vqkd'", "not a VQ-KD tokenizer")


def test_vocab_size_is_the_codebook_size(saved):
  config, _, path = saved[0], saved[1], saved[3]
  tok = config.tokenizer.copy_and_resolve_references()
  tok.vocab_size = 2 * CODES
  with pytest.raises(ConfigError) as e:
    tokenizers.load(tok, path)
  _one_line(e, f"tokenizer.vocab_size={2 * CODES}", f"{CODES} codes")


# --------------------------------------------------------------------------- the teacher


def _vit_teacher_checkpoint(path, width=TEACHER_DIM, image_size=SIZE, seed=None):
  """A beit-jax ViT checkpoint (zeros, or random weights with `seed`) as a teacher."""
  kw = dict(
    patch_size=PATCH,
    width=width,
    depth=2,
    num_heads=2,
    mlp_dim=2 * width,
    image_size=image_size,
    use_abs_pos_emb=True,
  )
  model = vit.VisionTransformer(**kw)
  shapes = jax.eval_shape(model.init, jax.random.key(5), jnp.zeros((1, image_size, image_size, 3)))
  flat = vit_params.flat(_zeros(shapes["params"]))
  if seed is not None:  # LayerNorm scales 1, the rest N(0, 0.2): features vary with the image
    rng = np.random.default_rng(seed)
    flat = {
      k: (np.ones_like(v) if k.endswith("scale") else rng.normal(0, 0.2, v.shape).astype(v.dtype))
      for k, v in flat.items()
    }
  vit_params.save(str(path), flat, vit_params.infer_model_kwargs(flat, "test", num_heads=2), "test")
  return str(path)


def test_teacher_checks_are_one_line(tmp_path):
  config = tiny_vqkd_config()
  config.tokenizer.teacher.update(kind="vit", init_from=_vit_teacher_checkpoint(tmp_path / "t16"))
  teacher, _ = vqkd.load_teacher(config)
  assert teacher.dim == TEACHER_DIM and teacher.normalization == "imagenet"
  assert vqkd.teacher_view(teacher) == View(SIZE, "bicubic", "imagenet")
  config.tokenizer.teacher.block = 0
  assert vqkd.load_teacher(config)[0].block == 0

  wide = config.copy_and_resolve_references()
  wide.tokenizer.teacher.init_from = _vit_teacher_checkpoint(tmp_path / "t24", width=24)
  with pytest.raises(ConfigError) as e:
    vqkd.load_teacher(wide)
  _one_line(e, f"tokenizer.teacher_dim={TEACHER_DIM}", "24-d")

  big = config.copy_and_resolve_references()
  big.tokenizer.teacher.init_from = _vit_teacher_checkpoint(tmp_path / "t64", image_size=64)
  with pytest.raises(ConfigError) as e:
    vqkd.load_teacher(big)
  _one_line(e, f"input.tokenizer_image_size={SIZE}", "64 patches")

  clip = config.copy_and_resolve_references()
  clip.tokenizer.teacher.update(kind="clip", block=None)
  with pytest.raises(ConfigError) as e:
    vqkd.load_teacher(clip)
  _one_line(e, "tokenizer.teacher.kind='clip'", "'vit' teacher")

  missing = tiny_vqkd_config()
  missing.tokenizer.teacher.kind = "dino"
  with pytest.raises(ConfigError) as e:
    vqkd.preflight(missing, str(tmp_path / "run"))
  _one_line(e, "tokenizer.teacher.init_from is empty")
  missing.tokenizer.teacher.block = 3
  with pytest.raises(ConfigError) as e:
    trainers.validate_config(missing)
  _one_line(e, "tokenizer.teacher.block=3", "'vit'")


def _recipe_config(width=TEACHER_DIM, image_size=SIZE):
  """tiny_vqkd_config with a 'vit' teacher to be trained first by a 2-step recipe."""
  config = tiny_vqkd_config()
  recipe = finetune_tiny_local.get_config("steps=2,batch=8")
  recipe.model.update(dict(width=width, depth=1, num_heads=2, mlp_dim=2 * width))
  recipe.input.update(dict(dataset="embedded:photos", image_size=image_size, eval_batch_size=64))
  recipe.eval_every_steps = 2
  config.tokenizer.teacher.update(dict(kind="vit", recipe=recipe))
  return config


def test_a_teacher_recipe_that_cannot_fit_stops_before_any_compute(tmp_path):
  for config, fragments in (
    (_recipe_config(width=24), (f"tokenizer.teacher_dim={TEACHER_DIM}", "width 24")),
    (_recipe_config(image_size=64), ("recipe.input.image_size=64", "8x8", "4x4")),
  ):
    with pytest.raises(ConfigError) as e:
      trainers.run(config, str(tmp_path / "run"))
    _one_line(e, *fragments)
  assert not (tmp_path / "run").exists()
  bad = _recipe_config()
  bad.tokenizer.teacher.recipe.trainer = "dvae"
  with pytest.raises(ConfigError) as e:
    trainers.validate_config(bad)
  _one_line(e, "tokenizer.teacher.recipe=")


@pytest.mark.slow
def test_a_teacher_recipe_trains_the_teacher_first_then_vqkd_reads_it(tmp_path):
  config = _recipe_config()
  run = tmp_path / "run"
  trainers.run(config, str(run))
  teacher = params_lib.read(str(run / "teacher"))
  written = json.loads((run / "config.json").read_text())
  assert written["tokenizer"]["teacher"]["init_from"] == str(run / "teacher")
  # The VQ-KD run distilled that checkpoint: its teacher loads with the trained weights.
  config.tokenizer.teacher.init_from = str(run / "teacher")
  loaded, params = vqkd.load_teacher(config)
  ours, trained = vit_params.flat(params), vit_params.flat(teacher)
  assert loaded.dim == TEACHER_DIM and set(ours) <= set(trained), (set(ours), set(trained))
  for key, value in ours.items():
    np.testing.assert_array_equal(value, trained[key], err_msg=key)


def test_shipped_configs_pass_and_follow_unilm():
  for module in (vqkd_clip_base, vqkd_dino_base, vqkd_tiny_local):
    trainers.validate_config(module.get_config())
  c = vqkd_clip_base.get_config()
  t = c.tokenizer
  assert (t.vocab_size, t.code_dim, t.teacher_dim, t.decoder.depth) == (8192, 32, 512, 3)
  assert (c.input.batch_size, c.num_epochs, c.total_steps, c.optim.lr) == (512, 100, 0, 2e-4)
  assert (c.optim.b2, c.optim.weight_decay, c.optim.grad_clip) == (0.99, 1e-4, 0.0)
  assert (c.optim.warmup_epochs, c.optim.min_lr, c.ema_decay) == (10, 1e-5, 0.99)
  assert c.input.crop_scale == (0.08, 1.0) and c.input.color_jitter == 0 and c.input.flip
  assert not c.restart_dead_codes
  # A VQ-KD run reads no ViT and no masks: its config has neither.
  assert "model" not in c and "mask" not in c.input
  assert vqkd_dino_base.get_config().tokenizer.teacher_dim == 768


# --------------------------------------------------------------------------- the step


def _batch(config, seed=0, nan=False):
  rng = np.random.default_rng(seed)
  b = config.input.batch_size
  images = rng.uniform(-1, 1, (b, SIZE, SIZE, 3)).astype(np.float32)
  if nan:
    images[0, 0, 0, 0] = np.nan
  return {"image": images, "teacher_image": (images * 1.7 + 0.1).astype(np.float32)}


def _setup(config, mesh):
  return runner.setup(config, vqkd.make_task(config), mesh)


def _run(built, mesh, batches):
  """The jitted step on `batches` from the initial state (copied: the step donates it)."""
  state, metrics = jax.tree.map(jnp.copy, built.state), []
  for batch in batches:
    state, m = built.step(state, sharding.host_to_global(batch, mesh), built.frozen)
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def _steps(config, mesh, batches):
  return _run(_setup(config, mesh), mesh, batches)


@pytest.fixture(scope="module")
def single():
  """The tiny config's step on one device, compiled once for the tests below."""
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  return _setup(tiny_vqkd_config(), mesh), mesh


def test_sharded_step_equals_single_device_step_codebook_included(single):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  config = tiny_vqkd_config()
  batches = [_batch(config, s) for s in range(3)]
  init = jax.device_get(single[0].state)
  one, m1 = _run(*single, batches)
  eight, m8 = _steps(config, sharding.make_mesh({"data": 8}), batches)
  cb1, cb8 = one.params["codebook"], eight.params["codebook"]
  assert bool(cb8["initted"]) and int(eight.step) == 3
  # k-means then EMA on 8 devices: the codebook of the whole batch on one.
  np.testing.assert_allclose(cb1["embedding"], cb8["embedding"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cb1["cluster_size"], cb8["cluster_size"], rtol=1e-5, atol=1e-5)
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(one.params["params"]),
    jax.tree.leaves(eight.params["params"]),
  ):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))
  for a, b in zip(m1, m8):
    for key in (
      "loss",
      "cosine_loss",
      "commitment_loss",
      "codebook_perplexity",
      "used_codes",
      "dead_codes",
    ):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
  # The codebook did move (k-means, then EMA each step).
  assert not bool(init.params["codebook"]["initted"])
  assert np.abs(init.params["codebook"]["embedding"] - cb8["embedding"]).max() > 0
  assert np.abs(cb8["cluster_size"]).sum() > 0
  assert {
    "cosine_loss",
    "commitment_loss",
    "codebook_perplexity",
    "used_codes",
    "used_fraction",
    "dead_codes",
    "dead_fraction",
    "learning_rate",
  } <= set(m8[-1])


def test_non_finite_step_leaves_codebook_and_params_unchanged(single):
  config = tiny_vqkd_config()
  # A bad first step: no k-means either, the codebook stays un-initialised.
  first, _ = _run(*single, [_batch(config, 0, nan=True)])
  assert not bool(first.params["codebook"]["initted"])
  good, _ = _run(*single, [_batch(config, 0)])
  both, m = _run(*single, [_batch(config, 0), _batch(config, 1, nan=True)])
  assert m[1]["skipped_steps"] == 1 and m[0]["skipped_steps"] == 0
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(good.params), jax.tree.leaves(both.params)
  ):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  # ...and a good step does change it (the check can fail).
  two, _ = _run(*single, [_batch(config, 0), _batch(config, 1)])
  assert (
    np.abs(two.params["codebook"]["embedding"] - good.params["codebook"]["embedding"]).max() > 0
  )


def test_optimizer_never_touches_the_codebook():
  config = tiny_vqkd_config()
  config.optim.update(weight_decay=0.5, warmup_steps=0, warmup_epochs=0)
  task = vqkd.make_task(config)
  params = jax.jit(task.init_params)(jax.random.key(0))
  opt_state = task.tx.init(params)
  n_adam = sum(x.size for x in jax.tree.leaves(opt_state))
  n_params = sum(x.size for x in jax.tree.leaves(params["params"]))
  assert n_adam < 2 * n_params + 10  # moments of 'params' only
  grads = jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), params)
  updates, _ = task.tx.update(grads, opt_state, params)
  for leaf in jax.tree.leaves(updates["codebook"]):
    assert not np.any(np.asarray(leaf))
  assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(updates["params"])) > 0


def test_restart_option_revives_dead_codes_in_the_step(single):
  mesh = single[1]
  batches = [_batch(tiny_vqkd_config(), s) for s in range(2)]
  # With 8 x 16 patches for 32 codes, every code is below a threshold of 1e3.
  off, m_off = _run(*single, batches)
  on, m_on = _steps(tiny_vqkd_config(dead_threshold=1e3, restart_dead_codes=True), mesh, batches)
  assert "restarted_codes" not in m_off[-1]
  assert m_on[-1]["restarted_codes"] == CODES  # all dead: all restarted
  assert m_on[-1]["dead_codes"] == CODES  # counted before the restart
  assert np.abs(on.params["codebook"]["embedding"] - off.params["codebook"]["embedding"]).max() > 0
  np.testing.assert_allclose(
    np.linalg.norm(on.params["codebook"]["embedding"], axis=-1), 1.0, atol=1e-5
  )
  assert float(on.params["codebook"]["cluster_size"].min()) >= 1e3 * 0.99


# --------------------------------------------------------------------------- whole runs


def _scalars(workdir):
  """tag -> values of the scalars clu wrote (TF2 summaries are stored as tensors)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    values = [tf.make_ndarray(e.tensor_proto) for e in acc.Tensors(tag)]
    if all(v.ndim == 0 for v in values):  # not the pictures
      out[tag] = [float(v) for v in values]
  return out


@pytest.mark.slow
def test_tiny_run_through_main_learns_and_leaves_pictures(tmp_path):
  config = tiny_vqkd_config(total_steps=30)
  config.tokenizer.teacher.update(
    kind="vit", init_from=_vit_teacher_checkpoint(tmp_path / "teacher", seed=0)
  )
  config.update(dict(log_every_steps=5, images_every_steps=30))
  config.optim.update(lr=2e-3, warmup_steps=4)
  metrics = main.run(config, str(tmp_path / "run"))
  assert np.isfinite(metrics["cosine_loss"]) and np.isfinite(metrics["commitment_loss"])
  logged = _scalars(tmp_path / "run")
  cos = logged["cosine_loss"]
  assert len(cos) >= 6 and all(np.isfinite(cos)) and all(np.isfinite(logged["commitment_loss"]))
  assert np.mean(cos[-2:]) < 0.8 * cos[0], cos
  for key in ("codebook_perplexity", "used_codes", "dead_codes", "dead_fraction", "learning_rate"):
    assert key in logged, key
  pngs = sorted(p.name for p in (tmp_path / "run" / "images").iterdir())
  assert any(p.startswith("vqkd_token_maps_") for p in pngs), pngs
  assert any(p.startswith("vqkd_code_patches_") for p in pngs), pngs
  # The workdir is a tokenizer a MIM run can load.
  tok, params = tokenizers.load(config.tokenizer, str(tmp_path / "run"))
  assert tok.tokenize(params, _images()).shape == (3, GRID, GRID)


def test_a_mim_step_tokenizes_with_vqkd(saved):
  """The MIM step runs VQ-KD's tokenize on device, its params (codebook included) a jit
  argument; the MIM run validates with a 'vqkd' tokenizer and would train it first."""
  from beit_jax.trainers import mim  # pylint: disable=g-import-not-at-top
  from tests.tiny_config import tiny_config  # pylint: disable=g-import-not-at-top

  vq_config, tokenizer, params, path = saved
  config = tiny_config()
  common.set_tokenizer(config, vq_config.copy_and_resolve_references())
  trainers.validate_config(config)
  ((stage, stage_dir),) = mim.prerequisites(config, "/tmp/w")
  assert stage.trainer == "vqkd" and stage_dir == "/tmp/w/tokenizer"
  # Stage 1 is the recipe as it is: its own crops, not the MIM run's.
  config.input.update(dict(crop_scale=(0.2, 1.0), color_jitter=0.4))
  ((stage, _),) = mim.prerequisites(config, "/tmp/w")
  assert stage.to_dict() == vq_config.to_dict()
  assert (stage.input.crop_scale, stage.input.color_jitter) == ((0.08, 1.0), 0.0)
  trainers.validate_config(stage)
  # What the MIM run reads of its tokenizer is what the recipe trains: one field, linked ...
  linked = copy.deepcopy(config)
  linked.tokenizer.recipe.tokenizer.encoder.depth = 2
  assert linked.tokenizer.encoder.depth == 2
  mim.prerequisites(linked, "/tmp/w")
  # ... and checked where the link is gone (a config read back from a workdir's JSON).
  read_back = ml_collections.ConfigDict(json.loads(config.to_json()))
  read_back.tokenizer.recipe.tokenizer.encoder.depth = 2
  with pytest.raises(
    ConfigError,
    match=r"^tokenizer.encoder.depth=1 but "
    r"tokenizer.recipe.tokenizer.encoder.depth=2: ",
  ):
    mim.prerequisites(read_back, "/tmp/w")
  tokenizer, tok_params = tokenizers.load(config.tokenizer, path)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  built = runner.setup(
    config, mim.make_task(config, frozen={"tokenizer": (tokenizer, tok_params)}), mesh
  )
  rng = np.random.default_rng(0)
  b = config.input.batch_size
  mask = np.zeros((b, GRID * GRID), bool)
  mask[:, :5] = True
  batch = {
    "image": rng.normal(size=(b, SIZE, SIZE, 3)).astype(np.float32),
    "tokenizer_image": rng.uniform(-1, 1, (b, SIZE, SIZE, 3)).astype(np.float32),
    "mask": mask,
  }
  _, m = built.step(built.state, sharding.host_to_global(batch, mesh), built.frozen)
  assert np.isfinite(float(m["loss"])) and float(m["loss"]) > 0


def test_visualize_takes_a_v2_run_and_its_vqkd_tokenizer(saved, tmp_path):
  """Attention maps of a v2 MIM model (aggregation decoder included in the checkpoint) and
  the token map of its VQ-KD tokenizer, through `python -m beit_jax.visualize`'s `run`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from beit_jax import visualize  # pylint: disable=g-import-not-at-top
  from beit_jax.training import visuals  # pylint: disable=g-import-not-at-top
  from beit_jax.training import mim_objective  # pylint: disable=g-import-not-at-top
  from tests.tiny_config import tiny_config  # pylint: disable=g-import-not-at-top

  vq_config, _, tok_params, _ = saved
  config = tiny_config()
  config.tokenizer = vq_config.tokenizer.copy_and_resolve_references()
  config.model.patch_aggregation = dict(layer=1, depth=1)
  model = mim_objective.make_model(config, train=False)
  params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  assert "cls_pt_layers_0" in params
  root = tmp_path / "run"
  for path, p in ((root, params), (root / "tokenizer", tok_params)):
    checkpoint.save_params(str(path), p)
    (path / "config.json").write_text(config.to_json_best_effort())
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), np.uint8)).save(
    tmp_path / "x.png"
  )
  out = tmp_path / "out"
  visualize.run(
    checkpoint_dir=str(root),
    tokenizer_dir=str(root / "tokenizer"),
    images=str(tmp_path / "x.png"),
    out=str(out),
    layers="0,1",
    heads="0",
  )
  cell = SIZE * 4 + 2  # 4x enlarged cells and visuals.image_grid's 2-pixel gap
  attention = np.asarray(Image.open(out / "x_attention_r2c2.png"))
  top, left = visuals.label_margins(["head 0", "mean"], ["layer 0", "layer 1"], cell)
  # Head 0 and the mean; layers 0 and 1; the label margins.
  assert attention.shape == (top + 2 * cell, left + 2 * cell, 3)
  tokens = np.asarray(Image.open(out / "x_tokens.png"))
  top, _ = visuals.label_margins(None, ["image", "tokens"], cell)
  # Image and token map: VQ-KD decodes no pixels.
  assert tokens.shape == (top + cell, 2 * cell, 3)


def test_the_pipeline_gives_both_views_of_one_crop():
  from beit_jax.data import pretrain  # pylint: disable=g-import-not-at-top

  config = tiny_vqkd_config()
  own = tokenizers.view(config)
  teacher = View(SIZE, "bicubic", "clip")
  both = next(
    pretrain.make_tokenizer_iterator(config, {"image": own, "teacher_image": teacher}, seed=0)
  )
  alone = next(pretrain.make_tokenizer_iterator(config, own, seed=0))
  assert set(both) == {"image", "teacher_image"} and set(alone) == {"image"}
  np.testing.assert_array_equal(both["image"], alone["image"])  # a View is {"image": it}
  assert both["image"].min() >= -1 - 1e-6 and both["image"].min() < -0.5
  # The same crop and flip, in the two value mappings.
  np.testing.assert_allclose(
    own.to_pixels(both["image"]), teacher.to_pixels(both["teacher_image"]), atol=1e-5
  )
