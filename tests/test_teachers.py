"""Tests of BEiT v2's teachers (models/teachers.py) and their importers (convert/teachers.py).

Parity is against randomly initialised HuggingFace models built here from tiny configs
(no downloads); the OpenAI CLIP and DINO layouts are written out from those models'
weights by the renaming their sources use. Torch tests skip without torch /
transformers (`pip install -r requirements-interop.txt`).
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from beit_jax.params import vit as vit_params
from beit_jax.convert import teachers as convert
from beit_jax.data import views
from beit_jax.errors import ConfigError
from beit_jax.models import teachers
from beit_jax.models import vit

WIDTH, DEPTH, HEADS, MLP, PATCH, IMAGE, PROJ = 32, 2, 2, 64, 8, 32, 16
N = (IMAGE // PATCH) ** 2
ATOL = 1e-4
# The statistics each teacher was trained with (CLIP's from OpenAI, DINO's ImageNet's).
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IN_MEAN, IN_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VISION_TINY = dict(
  hidden_size=WIDTH,
  intermediate_size=MLP,
  num_hidden_layers=DEPTH,
  num_attention_heads=HEADS,
  patch_size=PATCH,
  image_size=IMAGE,
)
TEXT_TINY = dict(
  hidden_size=WIDTH,
  intermediate_size=MLP,
  num_hidden_layers=1,
  num_attention_heads=HEADS,
  vocab_size=64,
  max_position_embeddings=8,
  bos_token_id=0,
  eos_token_id=1,
  pad_token_id=1,
)


def _images01(seed=0, batch=2):
  return np.random.default_rng(seed).random((batch, IMAGE, IMAGE, 3)).astype(np.float32)


def _max_abs(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def _random_params(shapes, seed=0):
  """Nonzero random params of a ShapeDtypeStruct tree (LayerNorm scales around 1).

  Numpy, not `module.init`: no compilation.
  """
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(shapes)
  return traverse_util.unflatten_dict(
    {
      path: (rng.normal(0.0, 0.2, s.shape) + (path[-1] == "scale")).astype(np.float32)
      for path, s in flat.items()
    }
  )


def _assert_one_line(excinfo, *fragments):
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  for fragment in fragments:
    assert fragment in msg, msg


# ------------------------------------------------------------ without torch
def test_each_teacher_names_its_view_with_the_published_statistics():
  """Normalisation is a view (data/views.py), named by the teacher, not model code."""
  x = _images01()
  for teacher, name, mean, std in [
    (
      teachers.clip_teacher(
        patch_size=PATCH,
        width=WIDTH,
        depth=1,
        num_heads=HEADS,
        mlp_dim=MLP,
        image_size=IMAGE,
        proj_dim=PROJ,
      ),
      "clip",
      CLIP_MEAN,
      CLIP_STD,
    ),
    (
      teachers.dino_teacher(
        patch_size=PATCH, width=WIDTH, depth=1, num_heads=HEADS, mlp_dim=MLP, image_size=IMAGE
      ),
      "imagenet",
      IN_MEAN,
      IN_STD,
    ),
    (teachers.vit_teacher(VIT_KW), "imagenet", IN_MEAN, IN_STD),
  ]:
    assert teacher.normalization == name
    want = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    got = _teacher_view(teacher, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _teacher_view(teacher, images01):
  """What the input pipeline gives the teacher: its view's value mapping of [0, 1] pixels."""
  return np.asarray(
    views.View(teacher.image_size, "bicubic", teacher.normalization).to_model(
      np.asarray(images01, np.float32)
    ),
    np.float32,
  )


def test_default_sizes_are_b16():
  """The defaults are the ViT-B/16 teachers of BEiT v2: [B, 196, 512] and [B, 196, 768]."""
  clip, dino = teachers.clip_teacher(), teachers.dino_teacher()
  for teacher, dim in [(clip, 512), (dino, 768)]:
    assert (teacher.num_patches, teacher.dim, teacher.image_size) == (196, dim, 224)
    out = jax.eval_shape(
      teacher.features, teacher.param_shapes(), jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    )
    assert out.shape == (2, 196, dim) and out.dtype == jnp.float32
  shapes = jax.tree_util.tree_map(lambda s: s.shape, clip.param_shapes())
  assert shapes["proj"] == (768, 512) and shapes["positional_embedding"] == (197, 768)
  assert shapes["resblocks_11"]["attn"]["in_proj"]["kernel"] == (768, 3 * 768)
  assert shapes["resblocks_11"]["mlp"]["c_fc"]["kernel"] == (768, 3072)
  assert "bias" not in shapes["conv1"]
  shapes = jax.tree_util.tree_map(lambda s: s.shape, dino.param_shapes())
  assert shapes["pos_embed"] == (1, 197, 768) and "bias" in shapes["patch_embed"]


def test_features_are_frozen():
  teacher = teachers.dino_teacher(
    patch_size=PATCH, width=WIDTH, depth=1, num_heads=HEADS, mlp_dim=MLP, image_size=IMAGE
  )
  params = _random_params(teacher.param_shapes())
  x = jnp.asarray(_images01())

  @jax.jit
  def grads(params, x):
    frozen = jax.grad(lambda p, im: jnp.sum(teacher.features(p, im) ** 2), argnums=(0, 1))(
      params, x
    )
    # Without the stop_gradient the same function has gradients: the check can fail.
    raw = jax.grad(lambda im: jnp.sum(teacher.module.apply({"params": params}, im) ** 2))(x)
    return frozen, raw

  (g_params, g_images), raw = grads(params, x)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(g_params))
  assert float(jnp.max(jnp.abs(g_images))) == 0.0
  assert float(jnp.max(jnp.abs(raw))) > 0.0


def test_wrong_sizes_and_shapes_are_value_errors_naming_them():
  teacher = teachers.clip_teacher(
    patch_size=PATCH,
    width=WIDTH,
    depth=1,
    num_heads=HEADS,
    mlp_dim=MLP,
    image_size=IMAGE,
    proj_dim=PROJ,
  )
  with pytest.raises(ValueError) as e:
    jax.eval_shape(
      teacher.features,
      teacher.param_shapes(),
      jax.ShapeDtypeStruct((1, 2 * IMAGE, 2 * IMAGE, 3), jnp.float32),
    )
  assert str(e.value).startswith(
    f"ClipVisionTower: images [1, {2 * IMAGE}, {2 * IMAGE}, 3]: "
    f"expected [B, {IMAGE}, {IMAGE}, 3] (image_size {IMAGE})"
  ), e.value
  bad = teachers.DinoViT(
    patch_size=PATCH, width=WIDTH, depth=1, num_heads=WIDTH + 1, mlp_dim=MLP, image_size=IMAGE
  )
  with pytest.raises(ValueError) as e:
    jax.eval_shape(bad.init, jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))
  assert str(e.value).startswith(
    f"DinoViT: width {WIDTH} is not divisible by num_heads {WIDTH + 1}"
  ), e.value


VIT_KW = dict(
  patch_size=PATCH,
  width=WIDTH,
  depth=DEPTH,
  num_heads=HEADS,
  mlp_dim=MLP,
  image_size=IMAGE,
  use_abs_pos_emb=True,
)


def _random_vit(seed=0):
  model = vit.VisionTransformer(**VIT_KW)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))
  # Nonzero gammas / tables / biases so every block changes the tokens.
  return model, _random_params(shapes["params"], seed)


def test_vit_teacher_patch_tokens_of_any_block():
  model, params = _random_vit()
  x = _images01()
  normed = (x - np.array(IN_MEAN, np.float32)) / np.array(IN_STD, np.float32)
  blocks = (None, 0, 1)

  @jax.jit
  def run(params, x, normed):  # one compilation for all
    ref = model.apply({"params": params}, normed, return_hidden=(0, 1))
    ours = [teachers.vit_teacher(VIT_KW, b).features(params, normed) for b in blocks]
    return ours, [ref["tokens"][:, 1:], ref["hidden"][0][:, 1:], ref["hidden"][1][:, 1:]]

  ours, want = run(params, jnp.asarray(x), jnp.asarray(normed))
  for block, a, b in zip(blocks, ours, want):
    assert a.shape == (2, N, WIDTH), block
    assert _max_abs(a, b) < 1e-5, block
  assert _max_abs(ours[1], ours[2]) > 1e-2  # the blocks differ: the choice matters
  assert teachers.vit_teacher(VIT_KW, -1) == teachers.vit_teacher(VIT_KW, 1)
  assert teachers.vit_teacher(VIT_KW, -2).block == 0
  assert teachers.vit_teacher(VIT_KW).dim == WIDTH
  with pytest.raises(ValueError) as e:
    teachers.vit_teacher(VIT_KW, DEPTH)
  _assert_one_line(e, f"vit_teacher: block {DEPTH} is not in {-DEPTH}..{DEPTH - 1}")


def test_load_teacher_from_beit_jax_checkpoint(tmp_path):
  _, params = _random_vit(seed=3)
  flat = vit_params.flat(params)
  kw = vit_params.infer_model_kwargs(flat, "test", num_heads=HEADS)
  vit_params.save(str(tmp_path / "ckpt"), flat, kw, "test")
  teacher, loaded = convert.load_teacher(str(tmp_path / "ckpt"), block=0)
  assert teacher == teachers.vit_teacher(kw, 0)
  with pytest.raises(ConfigError) as e:  # the config's block: checked where it is read
    convert.load_teacher(str(tmp_path / "ckpt"), block=DEPTH)
  _assert_one_line(
    e, f"teacher block={DEPTH} must index the {DEPTH} blocks of", f"{-DEPTH}..{DEPTH - 1}"
  )
  assert teacher.module.use_abs_pos_emb and teacher.module.depth == DEPTH
  loaded = vit_params.flat(loaded)
  assert loaded.keys() == flat.keys()
  for path in flat:
    np.testing.assert_array_equal(loaded[path], flat[path])


def test_wrong_folders_are_one_line_errors(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ConfigError) as e:
    convert.load_hf_clip(str(empty))
  _assert_one_line(e, str(empty), "no config.json")
  with pytest.raises(ConfigError) as e:
    convert.load_teacher(str(empty))
  _assert_one_line(e, str(empty), "neither a HF folder")
  (empty / "config.json").write_text(json.dumps({"model_type": "beit"}))
  for load in (convert.load_hf_clip, convert.load_hf_dino, convert.load_teacher):
    with pytest.raises(ConfigError) as e:
      load(str(empty))
    _assert_one_line(e, str(empty), "'beit'")
  (empty / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
  with pytest.raises(ConfigError) as e:
    convert.load_hf_clip(str(empty))
  _assert_one_line(e, str(empty), "no model.safetensors or pytorch_model.bin")
  (empty / "config.json").write_text(json.dumps({"model_type": "vit"}))
  with pytest.raises(ConfigError) as e:
    convert.load_hf_clip(str(empty))
  _assert_one_line(e, "'vit'", "not CLIP")


def test_state_dict_errors_name_the_problem():
  rng = np.random.default_rng(0)
  with pytest.raises(ConfigError) as e:
    convert.clip_params({"foo": rng.normal(size=(2,))}, "sd.pt")
  _assert_one_line(e, "sd.pt", "not a CLIP image tower")
  with pytest.raises(ConfigError) as e:
    convert.dino_params({"cls_token": np.zeros((1, 1, 4))}, "dino.pth")
  _assert_one_line(e, "dino.pth", "not a DINO ViT")
  # A BEiT (unilm) state dict looks like timm's but is not a DINO ViT.
  beit_like = {
    "cls_token": np.zeros((1, 1, 64)),
    "pos_embed": np.zeros((1, 5, 64)),
    "patch_embed.proj.weight": np.zeros((64, 3, 8, 8)),
    "blocks.0.attn.q_bias": np.zeros(64),
  }
  with pytest.raises(ConfigError) as e:
    convert.dino_params(beit_like, "beit.pth")
  _assert_one_line(e, "beit.pth", "BEiT")


# ------------------------------------------------------------ HuggingFace (torch)
def _randomize(torch, model):
  """Nonzero random values everywhere (biases, embeddings, norms), so all of them matter."""
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(0.2 * torch.randn(p.shape, generator=gen))
      if "norm" in name and name.endswith("weight"):
        p.add_(1.0)
  return model.eval()


def _nchw(torch, images01, mean, std):
  x = (images01 - np.array(mean, np.float32)) / np.array(std, np.float32)
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _hf_clip_features(torch, model, images01):
  """BEiT v2's CLIP target from the torch model: proj(post_layernorm(tokens))[:, 1:]."""
  with torch.no_grad():
    tokens = model.vision_model(
      pixel_values=_nchw(torch, images01, CLIP_MEAN, CLIP_STD)
    ).last_hidden_state  # [B, N+1, D]
    feats = model.visual_projection(model.vision_model.post_layernorm(tokens[:, 1:]))
  return feats.numpy()


def _hf_dino_features(torch, model, images01):
  with torch.no_grad():
    out = model(pixel_values=_nchw(torch, images01, IN_MEAN, IN_STD)).last_hidden_state
  return out[:, 1:].numpy()


@pytest.fixture(scope="module")
def hf_clip_vision(torch, transformers, tmp_path_factory):
  config = transformers.CLIPVisionConfig(**VISION_TINY, projection_dim=PROJ)
  model = _randomize(torch, transformers.CLIPVisionModelWithProjection(config))
  folder = tmp_path_factory.mktemp("clip_vision")
  model.save_pretrained(str(folder))
  return model, str(folder)


@pytest.fixture(scope="module")
def hf_clip_model(torch, transformers, tmp_path_factory):
  config = transformers.CLIPConfig(
    text_config=TEXT_TINY, vision_config=VISION_TINY, projection_dim=PROJ
  )
  model = _randomize(torch, transformers.CLIPModel(config))
  folder = tmp_path_factory.mktemp("clip_model")
  model.save_pretrained(str(folder))
  return model, str(folder)


@pytest.fixture(scope="module")
def hf_dino(torch, transformers, tmp_path_factory):
  config = transformers.ViTConfig(**VISION_TINY, layer_norm_eps=1e-6)
  model = _randomize(torch, transformers.ViTModel(config, add_pooling_layer=False))
  folder = tmp_path_factory.mktemp("dino")
  model.save_pretrained(str(folder))
  return model, str(folder)


CLIP_KW = dict(
  patch_size=PATCH,
  width=WIDTH,
  depth=DEPTH,
  num_heads=HEADS,
  mlp_dim=MLP,
  image_size=IMAGE,
  proj_dim=PROJ,
  layer_norm_eps=1e-5,
  use_quick_gelu=True,
)
DINO_KW = dict(
  patch_size=PATCH,
  width=WIDTH,
  depth=DEPTH,
  num_heads=HEADS,
  mlp_dim=MLP,
  image_size=IMAGE,
  layer_norm_eps=1e-6,
)


@functools.partial(jax.jit, static_argnums=0)
def _jit_features(teacher, params, images):
  """Teacher.features, compiled once per (equal) teacher."""
  return teacher.features(params, images)


def _run(teacher, params, images01):
  """The teacher's features of [0, 1] pixels, shown to it in its own view."""
  return _jit_features(teacher, params, jnp.asarray(_teacher_view(teacher, images01)))


def _features(teacher_fn, params, kw, images01):
  return np.asarray(_run(teacher_fn(**kw), vit_params.nested(params), jnp.asarray(images01)))


@pytest.mark.parametrize("which", ["vision_with_projection", "clip_model"])
def test_hf_clip_parity(torch, hf_clip_vision, hf_clip_model, which):
  model, folder = hf_clip_vision if which == "vision_with_projection" else hf_clip_model
  params, kw = convert.load_hf_clip(folder)
  assert kw == CLIP_KW
  x = _images01(seed=1)
  ours = _features(teachers.clip_teacher, params, kw, x)
  theirs = _hf_clip_features(torch, model, x)
  assert ours.shape == (2, N, PROJ)
  assert _max_abs(ours, theirs) < ATOL
  teacher, nested = convert.load_teacher(folder)
  assert _max_abs(_run(teacher, nested, jnp.asarray(x)), theirs) < ATOL


def test_hf_clip_bin_same_params(torch, hf_clip_vision, tmp_path):
  model, folder = hf_clip_vision
  (tmp_path / "config.json").write_text(open(f"{folder}/config.json").read())
  torch.save(model.state_dict(), str(tmp_path / "pytorch_model.bin"))
  params, kw = convert.load_hf_clip(str(tmp_path))
  want, want_kw = convert.load_hf_clip(folder)
  assert kw == want_kw and params.keys() == want.keys()
  for path in params:
    np.testing.assert_array_equal(params[path], want[path])


def _openai_state_dict(hf_sd):
  """OpenAI CLIP's `visual.*` names of a HF CLIP vision state dict (numpy)."""
  h = {k.removeprefix("vision_model."): v for k, v in hf_sd.items()}
  sd = {
    "visual.conv1.weight": h["embeddings.patch_embedding.weight"],
    "visual.class_embedding": h["embeddings.class_embedding"],
    "visual.positional_embedding": h["embeddings.position_embedding.weight"],
    "visual.proj": h["visual_projection.weight"].T.copy(),
  }
  for ours, theirs in [("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")]:
    for p in ("weight", "bias"):
      sd[f"visual.{ours}.{p}"] = h[f"{theirs}.{p}"]
  for i in range(DEPTH):
    rb, layer = f"visual.transformer.resblocks.{i}.", f"encoder.layers.{i}."
    for ours, theirs in [
      ("ln_1", "layer_norm1"),
      ("ln_2", "layer_norm2"),
      ("attn.out_proj", "self_attn.out_proj"),
      ("mlp.c_fc", "mlp.fc1"),
      ("mlp.c_proj", "mlp.fc2"),
    ]:
      for p in ("weight", "bias"):
        sd[f"{rb}{ours}.{p}"] = h[f"{layer}{theirs}.{p}"]
    for p in ("weight", "bias"):
      sd[f"{rb}attn.in_proj_{p}"] = np.concatenate(
        [h[f"{layer}self_attn.{n}_proj.{p}"] for n in "qkv"]
      )
  return sd


def _load_safetensors(folder):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  return load_file(f"{folder}/model.safetensors")


def test_openai_layout_same_params_and_features(torch, hf_clip_model, tmp_path):
  model, folder = hf_clip_model
  want, want_kw = convert.load_hf_clip(folder)
  sd = _openai_state_dict(_load_safetensors(folder))
  # A whole OpenAI CLIP state dict also has a text tower and integer buffers.
  sd.update(
    {
      "transformer.resblocks.0.attn.in_proj_weight": np.ones((96, WIDTH), np.float32),
      "logit_scale": np.float32(4.6),
      "input_resolution": np.int64(IMAGE),
    }
  )
  params, kw = convert.clip_params(sd, "openai", num_heads=HEADS)
  assert kw == want_kw and params.keys() == want.keys()
  for path in params:
    np.testing.assert_array_equal(params[path], want[path])
  x = _images01(seed=2)
  assert (
    _max_abs(_features(teachers.clip_teacher, params, kw, x), _hf_clip_features(torch, model, x))
    < ATOL
  )

  tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
  torch.save(tensors, str(tmp_path / "clip.pt"))
  params, kw = convert.load_openai_clip(str(tmp_path / "clip.pt"), num_heads=HEADS)
  for path in params:
    np.testing.assert_array_equal(params[path], want[path])
  # Without num_heads: OpenAI's width / 64 rule cannot split width 32.
  with pytest.raises(ConfigError) as e:
    convert.load_openai_clip(str(tmp_path / "clip.pt"))
  _assert_one_line(e, "clip.pt", "num_heads")
  # A missing tensor is named.
  del tensors["visual.transformer.resblocks.1.mlp.c_proj.bias"]
  torch.save(tensors, str(tmp_path / "broken.pt"))
  with pytest.raises(ConfigError) as e:
    convert.load_openai_clip(str(tmp_path / "broken.pt"), num_heads=HEADS)
  _assert_one_line(e, "broken.pt", "missing keys visual.transformer.resblocks.1.mlp.c_proj.bias")


def test_openai_torchscript_archive(torch, hf_clip_vision, tmp_path):
  """OpenAI releases CLIP as TorchScript .pt files: their state_dict() is read."""
  _, folder = hf_clip_vision
  want, _ = convert.load_hf_clip(folder)
  root = torch.nn.Module()
  for key, value in _openai_state_dict(_load_safetensors(folder)).items():
    *path, leaf = key.split(".")
    module = root
    for name in path:
      if not hasattr(module, name):
        module.add_module(name, torch.nn.Module())
      module = getattr(module, name)
    module.register_parameter(
      leaf, torch.nn.Parameter(torch.from_numpy(value), requires_grad=False)
    )
  root.register_buffer("input_resolution", torch.tensor(IMAGE))
  torch.jit.script(root).save(str(tmp_path / "ViT-tiny.pt"))
  teacher, params = convert.load_teacher(str(tmp_path / "ViT-tiny.pt"), num_heads=HEADS)
  assert isinstance(teacher.module, teachers.ClipVisionTower)
  for path, value in vit_params.flat(params).items():
    np.testing.assert_array_equal(value, want[path])


def test_clip_vision_model_without_projection_is_refused(torch, transformers, tmp_path):
  model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION_TINY))
  model.save_pretrained(str(tmp_path))
  with pytest.raises(ConfigError) as e:
    convert.load_hf_clip(str(tmp_path))
  _assert_one_line(e, str(tmp_path), "visual_projection")


def test_hf_dino_parity(torch, hf_dino):
  model, folder = hf_dino
  params, kw = convert.load_hf_dino(folder)
  assert kw == DINO_KW
  x = _images01(seed=5)
  ours = _features(teachers.dino_teacher, params, kw, x)
  theirs = _hf_dino_features(torch, model, x)
  assert ours.shape == (2, N, WIDTH)
  assert _max_abs(ours, theirs) < ATOL
  teacher, nested = convert.load_teacher(folder)
  assert _max_abs(_run(teacher, nested, jnp.asarray(x)), theirs) < ATOL


def test_hf_dino_bin_with_in_memory_names(torch, hf_dino, tmp_path):
  """pytorch_model.bin of `model.state_dict()` (transformers 5's own names) reads the same."""
  model, folder = hf_dino
  (tmp_path / "config.json").write_text(open(f"{folder}/config.json").read())
  torch.save(model.state_dict(), str(tmp_path / "pytorch_model.bin"))
  params, kw = convert.load_hf_dino(str(tmp_path))
  want, want_kw = convert.load_hf_dino(folder)
  assert kw == want_kw and params.keys() == want.keys()
  for path in params:
    np.testing.assert_array_equal(params[path], want[path])


def test_dino_own_layout_same_params(torch, hf_dino, tmp_path):
  """DINO's .pth (timm names, as in dino_vitbase16_pretrain.pth) gives the HF folder's params."""
  _, folder = hf_dino
  want, want_kw = convert.load_hf_dino(folder)
  h = _load_safetensors(folder)
  sd = {"cls_token": h["embeddings.cls_token"], "pos_embed": h["embeddings.position_embeddings"]}
  for p in ("weight", "bias"):
    sd[f"patch_embed.proj.{p}"] = h[f"embeddings.patch_embeddings.projection.{p}"]
    sd[f"norm.{p}"] = h[f"layernorm.{p}"]
    for i in range(DEPTH):
      layer, block = f"encoder.layer.{i}.", f"blocks.{i}."
      for ours, theirs in [
        ("norm1", "layernorm_before"),
        ("norm2", "layernorm_after"),
        ("attn.proj", "attention.output.dense"),
        ("mlp.fc1", "intermediate.dense"),
        ("mlp.fc2", "output.dense"),
      ]:
        sd[f"{block}{ours}.{p}"] = h[f"{layer}{theirs}.{p}"]
      sd[f"{block}attn.qkv.{p}"] = np.concatenate(
        [h[f"{layer}attention.attention.{n}.{p}"] for n in ("query", "key", "value")]
      )
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, str(tmp_path / "dino.pth"))
  params, kw = convert.load_dino(str(tmp_path / "dino.pth"), num_heads=HEADS)
  assert kw == dict(want_kw, layer_norm_eps=1e-6) and params.keys() == want.keys()
  for path in params:
    np.testing.assert_array_equal(params[path], want[path])


def test_hf_beit_folder_is_not_a_teacher(torch, transformers, tmp_path):
  config = transformers.BeitConfig(
    hidden_size=WIDTH,
    num_hidden_layers=1,
    num_attention_heads=HEADS,
    intermediate_size=MLP,
    image_size=IMAGE,
    patch_size=PATCH,
  )
  transformers.BeitModel(config).save_pretrained(str(tmp_path))
  for load in (convert.load_hf_clip, convert.load_hf_dino, convert.load_teacher):
    with pytest.raises(ConfigError) as e:
      load(str(tmp_path))
    _assert_one_line(e, str(tmp_path), "'beit'")
  # Its weights under a ViT config: not a DINO ViT's tensors.
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="vit")))
  with pytest.raises(ConfigError) as e:
    convert.load_hf_dino(str(tmp_path))
  _assert_one_line(e, str(tmp_path), "BEiT weights", "not a DINO ViT")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["clip", "dino"])
def test_b16_defaults_match_hf_b16(torch, transformers, which):
  """At ViT-B/16 sizes (HF's own init) the inferred fields are the modules' defaults."""
  b16 = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    patch_size=16,
    image_size=224,
  )
  torch.manual_seed(0)
  if which == "clip":
    model = transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(**b16, projection_dim=512)
    ).eval()
  else:
    model = transformers.ViTModel(
      transformers.ViTConfig(**b16, layer_norm_eps=1e-6), add_pooling_layer=False
    ).eval()
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  if which == "clip":  # heads from OpenAI's width / 64 rule
    params, kw = convert.clip_params(convert.hf_clip_to_openai(sd, "b16"), "b16")
    teacher, default = teachers.clip_teacher(**kw), teachers.ClipVisionTower()
  else:
    params, kw = convert.dino_params(convert.hf_vit_to_timm(sd, "b16"), "b16")
    teacher, default = teachers.dino_teacher(**kw), teachers.DinoViT()
  assert teacher.module == default
  x = _images01(seed=6, batch=1)
  x = np.asarray(jax.image.resize(x, (1, 224, 224, 3), "linear"))
  ours = np.asarray(_run(teacher, vit_params.nested(params), jnp.asarray(x)))
  theirs = (_hf_clip_features if which == "clip" else _hf_dino_features)(torch, model, x)
  assert ours.shape == (1, 196, 512 if which == "clip" else 768)
  assert _max_abs(ours, theirs) < ATOL * max(1.0, float(np.abs(theirs).max()))
