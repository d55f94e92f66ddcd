"""Tests of the BEiT ViT (docs/reference.md §1): shapes, counts, init, masking, biases."""

import itertools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from beit_jax.models import vit

TINY = dict(patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64, image_size=32)
N = 16  # (32 / 8) ** 2 patches
VOCAB = 10


def _images(seed=0, batch=2, size=32):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)


def _flat(params):
  return flax.traverse_util.flatten_dict(params, sep="/")


def _random_params(module, *args, seed=0, std=0.1):
  """Generic parameters (nonzero biases, tables, gammas) without running init.

  Only shapes come from `module.init` (via eval_shape): compiling the
  initialisers costs seconds on CPU, and most tests need any values at all.
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  shapes = _flat(shapes)
  rng = np.random.default_rng(seed)
  return flax.traverse_util.unflatten_dict(
    {
      name: jnp.asarray(
        rng.normal(0.0, std, s.shape) + (1.0 if name.endswith("/scale") else 0.0), s.dtype
      )
      for name, s in shapes.items()
    },
    sep="/",
  )


@pytest.fixture(scope="module")
def mim():
  """Tiny pretraining model with generic parameters."""
  model = vit.VisionTransformer(**TINY, vocab_size=VOCAB)
  return model, _random_params(model, _images())


# ---------------------------------------------------------------- variants
def test_variant_kwargs():
  assert vit.variant_kwargs("B/16") == dict(
    width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16
  )
  assert vit.variant_kwargs("H/14")["width"] == 1280
  assert vit.variant_kwargs("Ti/8") == dict(vit.VARIANTS["Ti/16"], patch_size=8)
  kw = vit.variant_kwargs("L/16", depth=None, num_heads=8)
  assert kw["depth"] == 24 and kw["num_heads"] == 8
  # The model's errors are plain ValueErrors naming the value, never a config field
  # (the config's `model.variant` is checked at start: beit_jax/training/model_rules.py).
  with pytest.raises(ValueError, match=r"^ViT variant 'X/16': expected <size>/<patch>.*B/16"):
    vit.variant_kwargs("X/16")
  with pytest.raises(ValueError, match=r"^ViT variant 'B16': expected <size>/<patch>"):
    vit.variant_kwargs("B16")


def test_image_size_must_be_multiple_of_patch():
  assert vit.num_patches(224, 16) == 196
  with pytest.raises(
    ValueError,
    match=r"^image size 225 is not a positive multiple of "
    r"patch size 16$",
  ):
    vit.num_patches(225, 16)
  model = vit.VisionTransformer(**dict(TINY, image_size=30))
  with pytest.raises(
    ValueError,
    match=r"^image size 30 is not a positive multiple of "
    r"patch size 8",
  ):
    model.init(jax.random.key(0), _images(size=30))


def test_bad_attributes_are_value_errors_naming_them():
  images = _images()
  for kw, match in [
    (
      dict(width=30, num_heads=4),
      r"^Attention: width 30 \(inputs \[2, 17, 30\]\) is not "
      r"divisible by num_heads 4",
    ),
    (dict(depth=0), r"^VisionTransformer: depth 0 is not >= 1"),
    (
      dict(remat=True, remat_policy="everything"),
      r"^VisionTransformer: remat_policy 'everything' is not one of",
    ),
  ]:
    with pytest.raises(ValueError, match=match) as e:
      jax.eval_shape(vit.VisionTransformer(**dict(TINY, **kw)).init, jax.random.key(0), images)
    assert type(e.value) is ValueError, e.value  # pylint: disable=unidiomatic-typecheck


def test_bad_call_arguments(mim):
  model, params = mim
  with pytest.raises(
    ValueError,
    match=r"^VisionTransformer: images \[2, 40, 40, 3\]: "
    r"expected \[B, 32, 32, C\] \(image_size 32\)",
  ):
    model.apply({"params": params}, _images(size=40))
  with pytest.raises(
    ValueError,
    match=r"^VisionTransformer: return_hidden \(2,\): blocks "
    r"\[2\] are not in 0..1 \(depth 2\)",
  ):
    model.apply({"params": params}, _images(), return_hidden=(2,))


# ---------------------------------------------------------- parameter counts
def _expected_count(
  width,
  depth,
  num_heads,
  mlp_dim,
  patch_size,
  *,
  grid,
  vocab=0,
  classes=0,
  shared_rel=False,
  block_rel=False,
  abs_pos=False,
  layer_scale=True,
):
  n = grid * grid
  rel_table = ((2 * grid - 1) ** 2 + 3) * num_heads
  block = (
    2 * width  # norm1
    + 3 * width * width
    + 2 * width  # qkv kernel, q_bias, v_bias
    + width * width
    + width  # proj
    + 2 * width  # norm2
    + width * mlp_dim
    + mlp_dim  # fc1
    + mlp_dim * width
    + width
  )  # fc2
  block += 2 * width if layer_scale else 0
  block += rel_table if block_rel else 0
  total = patch_size * patch_size * 3 * width + width  # patch_embed
  total += 2 * width  # cls, mask tokens
  total += (n + 1) * width if abs_pos else 0
  total += rel_table if shared_rel else 0
  total += depth * block
  if classes:
    total += 2 * width + width * classes + classes  # fc_norm, head
  else:
    total += 2 * width  # final norm
  total += width * vocab + vocab if vocab else 0
  return total


def _count(model):
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("variant", ["Ti/16", "S/16", "B/16", "L/16", "H/14"])
def test_param_count_pretraining(variant):
  kw = vit.variant_kwargs(variant)
  model = vit.VisionTransformer(**kw, vocab_size=8192)
  grid = 224 // kw["patch_size"]
  assert _count(model) == _expected_count(**kw, grid=grid, vocab=8192, shared_rel=True)


def test_param_count_other_configs():
  kw = vit.variant_kwargs("B/16")
  # The published 800-epoch BEiT-B: absolute positions, no LayerScale.
  model = vit.VisionTransformer(
    **kw, vocab_size=8192, use_abs_pos_emb=True, use_shared_rel_pos_bias=False, layer_scale_init=0.0
  )
  assert _count(model) == _expected_count(
    **kw, grid=14, vocab=8192, abs_pos=True, layer_scale=False
  )
  # Fine-tuning model: per-block bias tables, mean pooling, 1000 classes.
  model = vit.VisionTransformer(
    **kw, num_classes=1000, use_shared_rel_pos_bias=False, use_rel_pos_bias=True
  )
  count = _count(model)
  assert count == _expected_count(**kw, grid=14, classes=1000, block_rel=True)
  assert 86.4e6 < count < 86.6e6  # unilm's BEiT-B classifier: 86.5M


# ------------------------------------------------------- relative positions
@pytest.mark.parametrize("grid", [(3, 4), (14, 14)])
def test_relative_position_index_brute_force(grid):
  h, w = grid
  num_rel = (2 * h - 1) * (2 * w - 1) + 3
  coords = [(i, j) for i in range(h) for j in range(w)]  # row-major
  expected = np.zeros((h * w + 1, h * w + 1), np.int64)
  for q, k in itertools.product(range(h * w + 1), repeat=2):
    if q == 0 and k == 0:
      expected[q, k] = num_rel - 1  # cls-to-cls
    elif q == 0:
      expected[q, k] = num_rel - 3  # cls-to-token
    elif k == 0:
      expected[q, k] = num_rel - 2  # token-to-cls
    else:
      dh = coords[q - 1][0] - coords[k - 1][0]
      dw = coords[q - 1][1] - coords[k - 1][1]
      expected[q, k] = (dh + h - 1) * (2 * w - 1) + (dw + w - 1)
  np.testing.assert_array_equal(vit.relative_position_index(grid), expected)
  if grid == (14, 14):
    assert num_rel == 732


# ------------------------------------------------------------------ outputs
def test_mim_outputs(mim):
  model, params = mim
  out = model.apply({"params": params}, _images(), return_hidden=(0, 1), return_attention=True)
  assert set(out) == {"tokens", "mim_logits", "hidden", "attention"}
  assert out["tokens"].shape == (2, N + 1, 32)
  assert out["mim_logits"].shape == (2, N, VOCAB)
  assert set(out["hidden"]) == {0, 1}
  assert all(h.shape == (2, N + 1, 32) for h in out["hidden"].values())
  assert len(out["attention"]) == 2
  for attn in out["attention"]:
    assert attn.shape == (2, 4, N + 1, N + 1)
    assert jnp.all(attn >= 0)
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
  # Hidden outputs come before the final norm; tokens after it.
  assert not np.allclose(out["hidden"][1], out["tokens"], atol=1e-3)


def test_classification_outputs():
  model = vit.VisionTransformer(
    **TINY, num_classes=7, use_shared_rel_pos_bias=False, use_rel_pos_bias=True
  )
  variables = {"params": _random_params(model, _images())}
  names = set(_flat(variables["params"]))
  assert "norm/scale" not in names and "fc_norm/scale" in names
  assert "blocks_1/attn/relative_position_bias_table" in names
  assert not any(n.startswith("rel_pos_bias") for n in names)
  out = model.apply(variables, _images())
  assert set(out) == {"tokens", "logits"}
  assert out["logits"].shape == (2, 7)
  # logits = head(fc_norm(mean of patch tokens)); `norm` is the identity.
  p = variables["params"]
  pooled = _layer_norm(np.asarray(out["tokens"][:, 1:].mean(1)), p["fc_norm"])
  expected = pooled @ p["head"]["kernel"] + p["head"]["bias"]
  np.testing.assert_allclose(out["logits"], expected, atol=1e-4)


def test_mim_positions_gather(mim):
  model, params = mim
  images = _images()
  full = model.apply({"params": params}, images)["mim_logits"]
  pos = np.random.default_rng(3).integers(0, N, (2, 5), np.int32)
  part = model.apply({"params": params}, images, mim_positions=pos)
  assert part["mim_logits"].shape == (2, 5, VOCAB)
  np.testing.assert_allclose(part["mim_logits"], full[np.arange(2)[:, None], pos], atol=1e-5)


def _gelu(x):
  return 0.5 * x * (1 + special.erf(x / np.sqrt(2)))


def _layer_norm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _reference_forward(p, images, mask, patch, num_heads):
  """unilm's VisionTransformerForMaskedImageModeling in float64 numpy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  images = np.asarray(images, np.float64)
  b, size = images.shape[:2]
  g = size // patch
  patches = images.reshape(b, g, patch, g, patch, 3).transpose(0, 1, 3, 2, 4, 5)
  kernel = p["patch_embed"]["kernel"].reshape(-1, p["cls_token"].shape[-1])
  x = patches.reshape(b, g * g, -1) @ kernel + p["patch_embed"]["bias"]
  w = np.asarray(mask, np.float64)[..., None]
  x = x * (1 - w) + p["mask_token"] * w
  x = np.concatenate([np.broadcast_to(p["cls_token"], (b, 1, x.shape[-1])), x], axis=1)
  t, d = x.shape[1:]
  table = p["rel_pos_bias"]["relative_position_bias_table"]
  bias = table[vit.relative_position_index((g, g))].transpose(2, 0, 1)
  i = 0
  while f"blocks_{i}" in p:
    blk = p[f"blocks_{i}"]
    a = blk["attn"]
    y = _layer_norm(x, blk["norm1"])
    qkv = y @ a["qkv"]["kernel"].reshape(d, 3 * d) + np.concatenate(
      [a["q_bias"], np.zeros_like(a["v_bias"]), a["v_bias"]]
    )
    qkv = qkv.reshape(b, t, 3, num_heads, -1).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (d // num_heads) ** -0.5, qkv[1], qkv[2]
    logits = q @ k.transpose(0, 1, 3, 2) + bias
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    y = y @ a["proj"]["kernel"] + a["proj"]["bias"]
    x = x + blk["gamma_1"] * y
    y = _layer_norm(x, blk["norm2"])
    m = blk["mlp"]
    y = _gelu(y @ m["fc1"]["kernel"] + m["fc1"]["bias"])
    y = y @ m["fc2"]["kernel"] + m["fc2"]["bias"]
    x = x + blk["gamma_2"] * y
    i += 1
  x = _layer_norm(x, p["norm"])
  return x @ p["lm_head"]["kernel"] + p["lm_head"]["bias"]


def test_matches_numpy_reference(mim):
  model, _ = mim
  images = _images()
  # Large weights, so that details (e.g. erf vs tanh GELU) show in the output.
  params = _random_params(model, images, std=0.5)
  mask = np.random.default_rng(4).random((2, N)) < 0.4
  out = model.apply({"params": params}, images, mask)
  ref = _reference_forward(params, images, mask, 8, 4)
  np.testing.assert_allclose(out["mim_logits"], ref[:, 1:], atol=1e-4)


def test_remat_and_bfloat16_match(mim):
  model, params = mim
  images = _images()
  ref = model.apply({"params": params}, images)["mim_logits"]
  # jit: one compilation is cheaper than op-by-op for remat's new primitives.
  run = lambda m: jax.jit(m.apply)({"params": params}, images)["mim_logits"]
  remat = vit.VisionTransformer(**TINY, vocab_size=VOCAB, remat=True)
  np.testing.assert_allclose(run(remat), ref, atol=1e-5)
  out = run(vit.VisionTransformer(**TINY, vocab_size=VOCAB, dtype=jnp.bfloat16))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.1)
  assert not np.allclose(out, ref, atol=1e-4)  # really computed in bfloat16


# --------------------------------------------------------------------- init
def _trunc_std(std):
  """Std of N(0, std^2) cut at ±std, as torch trunc_normal_(a=-std, b=std)."""
  phi1 = math.exp(-0.5) / math.sqrt(2 * math.pi)
  return std * math.sqrt(1 - 2 * phi1 / math.erf(1 / math.sqrt(2)))


def _check_init(params, name, std, truncate, rtol=0.03):
  w = np.asarray(params[name])
  expected = _trunc_std(std) if truncate else std
  np.testing.assert_allclose(w.std(), expected, rtol=rtol, err_msg=name)
  assert abs(w.mean()) < 5 * expected / math.sqrt(w.size), name
  if truncate:
    assert np.abs(w).max() <= std * (1 + 1e-6), name
  else:
    assert np.abs(w).max() > 2 * std, name  # tails are not clipped


def test_init_rules_pretraining():
  # mlp_dim = vocab = width: fewer distinct shapes, so fewer compilations.
  depth = 3
  model = vit.VisionTransformer(
    patch_size=8, width=256, depth=depth, num_heads=4, mlp_dim=256, image_size=16, vocab_size=256
  )
  params = _flat(model.init(jax.random.key(0), _images(size=16))["params"])
  assert not any("k_bias" in n for n in params)
  assert "blocks_0/attn/qkv/bias" not in params
  for name, value in params.items():
    if name.endswith(("/bias", "q_bias", "v_bias", "relative_position_bias_table")):
      np.testing.assert_array_equal(value, 0, err_msg=name)
    if name.endswith("/scale"):
      np.testing.assert_array_equal(value, 1, err_msg=name)
    if "gamma_" in name:
      np.testing.assert_allclose(value, 0.1, err_msg=name)
  check = lambda name, std, rtol=0.03: _check_init(params, name, std, True, rtol)
  check("patch_embed/kernel", 0.02)
  check("lm_head/kernel", 0.02)
  check("cls_token", 0.02, rtol=0.25)  # only 256 values each
  check("mask_token", 0.02, rtol=0.25)
  for l in range(1, depth + 1):
    check(f"blocks_{l - 1}/attn/qkv/kernel", 0.02)
    check(f"blocks_{l - 1}/mlp/fc1/kernel", 0.02)
    check(f"blocks_{l - 1}/attn/proj/kernel", 0.02 / math.sqrt(2 * l))
    check(f"blocks_{l - 1}/mlp/fc2/kernel", 0.02 / math.sqrt(2 * l))


def test_init_rules_finetuning():
  model = vit.VisionTransformer(
    patch_size=8,
    width=256,
    depth=2,
    num_heads=4,
    mlp_dim=256,
    image_size=16,
    num_classes=256,
    head_init_scale=0.001,
    layer_scale_init=0.0,
    use_abs_pos_emb=True,
    truncate_init=False,
  )
  params = _flat(model.init(jax.random.key(0), _images(size=16))["params"])
  assert not any("gamma" in n for n in params)
  np.testing.assert_array_equal(params["head/bias"], 0)
  np.testing.assert_array_equal(params["fc_norm/scale"], 1)
  assert params["pos_embed"].shape == (1, 5, 256)
  check = lambda name, std: _check_init(params, name, std, False)
  check("head/kernel", 0.02 * 0.001)
  check("pos_embed", 0.02)
  check("blocks_0/attn/qkv/kernel", 0.02)
  check("blocks_1/mlp/fc1/kernel", 0.02)
  check("blocks_1/attn/proj/kernel", 0.02 / 2)
  check("blocks_1/mlp/fc2/kernel", 0.02 / 2)


# ----------------------------------------------------------------- masking
@pytest.mark.parametrize("abs_pos", [False, True])
def test_mask_token_replaces_masked_patches(abs_pos):
  model = vit.VisionTransformer(
    **TINY, vocab_size=VOCAB, use_abs_pos_emb=abs_pos, use_shared_rel_pos_bias=not abs_pos
  )
  images = _images()
  params = _random_params(model, images)
  apply = lambda p, im, m: model.apply({"params": p}, im, m)["mim_logits"]
  mask = jnp.zeros((2, N), bool).at[0, 5].set(True)  # patch (1, 1) of image 0
  base = apply(params, images, mask)
  # New pixels inside the masked patch: nothing changes.
  moved = images.at[0, 8:16, 8:16].add(1.0)
  np.testing.assert_array_equal(apply(params, moved, mask), base)
  # New pixels in an unmasked patch, or the same patch unmasked: it changes.
  assert not np.allclose(apply(params, images.at[0, :8, :8].add(1.0), mask), base, atol=1e-4)
  assert not np.allclose(
    apply(params, moved, jnp.zeros_like(mask)),
    apply(params, images, jnp.zeros_like(mask)),
    atol=1e-4,
  )
  # The mask token matters exactly for the images that have masked patches.
  other = dict(params, mask_token=-params["mask_token"])
  changed = apply(other, images, mask)
  assert not np.allclose(changed[0], base[0], atol=1e-4)
  np.testing.assert_array_equal(changed[1], base[1])
  # No mask == an all-False mask.
  np.testing.assert_array_equal(
    apply(params, images, None), apply(params, images, jnp.zeros_like(mask))
  )


# --------------------------------------------------------------- drop path
def test_drop_path_is_per_sample_and_rescaled():
  block = vit.Block(width=32, num_heads=4, mlp_dim=64, layer_id=1, drop_path_rate=0.5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 5, 32)), jnp.float32)
  params = _random_params(block, x)
  # Silence the MLP branch so the output is x + DropPath(gamma_1 * attn).
  params = dict(params, gamma_2=jnp.zeros_like(params["gamma_2"]))
  y_eval, _ = block.apply({"params": params}, x)
  y_eval2, _ = block.apply({"params": params}, x, None, False)
  np.testing.assert_array_equal(y_eval, y_eval2)
  y_train, _ = block.apply({"params": params}, x, None, True, rngs={"dropout": jax.random.key(2)})
  delta_eval, delta_train = y_eval - x, y_train - x
  dropped = np.all(np.abs(delta_train) < 1e-7, axis=(1, 2))
  kept = np.all(np.isclose(delta_train, delta_eval / 0.5, atol=1e-6), axis=(1, 2))
  assert np.all(dropped ^ kept)  # each sample wholly dropped or wholly kept
  assert 10 < dropped.sum() < 54


def test_drop_path_rates_follow_linspace(mim):
  _, params = mim
  model = vit.VisionTransformer(**TINY, vocab_size=VOCAB, drop_path_rate=0.5)
  images = _images()
  run = lambda train: model.apply(
    {"params": params},
    images,
    train=train,
    return_hidden=(0, 1),
    rngs={"dropout": jax.random.key(5)},
  )
  eval_out, train_out = run(False), run(True)
  # Block 0 has rate linspace(0, 0.5, 2)[0] == 0; block 1 has 0.5.
  np.testing.assert_array_equal(train_out["hidden"][0], eval_out["hidden"][0])
  assert not np.allclose(train_out["hidden"][1], eval_out["hidden"][1])
  no_dp = vit.VisionTransformer(**TINY, vocab_size=VOCAB)
  np.testing.assert_array_equal(
    no_dp.apply({"params": params}, images)["tokens"], eval_out["tokens"]
  )


# ------------------------------------------------------- relative position
def test_shared_rel_pos_bias_is_used(mim):
  model, params = mim
  images = _images()
  table = params["rel_pos_bias"]["relative_position_bias_table"]
  num_rel = table.shape[0]
  base = model.apply({"params": params}, images)["tokens"]
  with_table = lambda t: {**params, "rel_pos_bias": {"relative_position_bias_table": t}}
  changed = model.apply(
    {"params": with_table(table + 0.5 * jnp.arange(num_rel)[:, None] / num_rel)}, images
  )["tokens"]
  assert not np.allclose(changed, base, atol=1e-4)
  # A huge cls-to-cls entry makes [CLS] attend only to itself, in every block.
  out = model.apply(
    {"params": with_table(table.at[num_rel - 1].set(100.0))}, images, return_attention=True
  )
  for attn in out["attention"]:
    np.testing.assert_allclose(attn[:, :, 0, 0], 1.0, atol=1e-5)
  # A huge token-to-cls entry makes every patch attend only to [CLS].
  out = model.apply(
    {"params": with_table(table.at[num_rel - 2].set(100.0))}, images, return_attention=True
  )
  np.testing.assert_allclose(out["attention"][1][:, :, 1:, 0], 1.0, atol=1e-5)


def test_per_block_rel_pos_bias_is_used():
  model = vit.VisionTransformer(
    **TINY, vocab_size=VOCAB, use_shared_rel_pos_bias=False, use_rel_pos_bias=True
  )
  images = _images()
  params = _random_params(model, images)
  base = model.apply({"params": params}, images, return_attention=True)
  table = params["blocks_1"]["attn"]["relative_position_bias_table"]
  attn = dict(params["blocks_1"]["attn"], relative_position_bias_table=table.at[-1].set(100.0))
  params = {**params, "blocks_1": dict(params["blocks_1"], attn=attn)}
  out = model.apply({"params": params}, images, return_attention=True)
  np.testing.assert_array_equal(out["attention"][0], base["attention"][0])
  np.testing.assert_allclose(out["attention"][1][:, :, 0, 0], 1.0, atol=1e-5)
