"""BEiT v2 patch aggregation (docs/reference.md §4): what it reads, how it is numbered, and
that the MIM trainer trains both losses."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from beit_jax.training import runner
from beit_jax.training import sharding
from beit_jax import trainers
from beit_jax.errors import ConfigError
from beit_jax.models import vit
from beit_jax.trainers import mim
from tests.tiny_config import tiny_config

KW = dict(
  patch_size=8,
  width=32,
  depth=4,
  num_heads=2,
  mlp_dim=64,
  image_size=32,
  vocab_size=16,
  layer_scale_init=0.1,
)
N = 16  # 4x4 patches


def _inputs(seed=0, batch=2):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  mask = jnp.asarray(rng.random((batch, N)) < 0.4)
  return images, mask


def _init(model, seed=0):
  images, mask = _inputs()
  return jax.jit(model.init)(jax.random.key(seed), images, mask)["params"]


def _apply(model, params, *args, **kwargs):
  return model.apply({"params": params}, *args, **kwargs)


def _random(params, seed=0):
  """Generic nonzero values everywhere (tables, biases, gammas), so every weight matters."""
  rng = np.random.default_rng(seed)
  flat = {
    k: jnp.asarray(rng.normal(0, 0.2, v.shape) + (k[-1] == "scale"), jnp.float32)
    for k, v in traverse_util.flatten_dict(params).items()
  }
  return traverse_util.unflatten_dict(flat)


def _perturbed(params, block, seed=1):
  """`params` with every weight of `block` (e.g. 'blocks_2') moved at random."""
  rng = np.random.default_rng(seed)
  out = dict(params)
  out[block] = jax.tree.map(
    lambda x: x + jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), params[block]
  )
  return out


def test_off_is_the_v1_model_and_on_only_adds_the_decoder():
  v1, v2 = vit.VisionTransformer(**KW), vit.VisionTransformer(**KW, patch_aggregation_layer=2)
  p1, p2 = _init(v1), _init(v2)
  assert set(p2) - set(p1) == {"cls_pt_layers_0", "cls_pt_layers_1"}
  # The backbone's init does not depend on the decoder being there (rngs follow names).
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves({k: p2[k] for k in p1})):
    np.testing.assert_array_equal(a, b)
  images, mask = _inputs()
  o1, o2 = _apply(v1, p1, images, mask), _apply(v2, p2, images, mask)
  assert "mim_logits_c" not in o1
  np.testing.assert_array_equal(o1["mim_logits"], o2["mim_logits"])
  assert o2["mim_logits_c"].shape == o2["mim_logits"].shape == (2, N, 16)


@pytest.mark.parametrize("layer", [1, 3])
def test_reads_the_patches_of_block_layer_and_the_last_cls(layer):
  """unilm's early_layers=l: the patch outputs after l blocks (0-based block l-1)."""
  model = vit.VisionTransformer(**KW, patch_aggregation_layer=layer)
  params = _random(_init(model))
  images, mask = _inputs()

  def run(p):
    out = _apply(model, p, images, mask, return_hidden=(layer - 1, KW["depth"] - 1))
    rebuilt = _apply(
      model,
      p,
      out["hidden"][KW["depth"] - 1][:, :1],
      out["hidden"][layer - 1][:, 1:],
      method=vit.VisionTransformer.patch_aggregation_logits,
    )
    return out, rebuilt

  out, rebuilt = run(params)
  np.testing.assert_allclose(out["mim_logits_c"], rebuilt, atol=1e-6)
  # Another block's patches give other logits: the test can tell the blocks apart.
  for other in {0, layer, KW["depth"] - 1} - {layer - 1}:
    hidden = _apply(model, params, images, mask, return_hidden=(other,))["hidden"]
    wrong = _apply(
      model,
      params,
      out["hidden"][KW["depth"] - 1][:, :1],
      hidden[other][:, 1:],
      method=vit.VisionTransformer.patch_aggregation_logits,
    )
    assert np.abs(np.asarray(wrong - out["mim_logits_c"])).max() > 1e-3

  # A block after `layer` changes L_MIM^c only through the last [CLS]: with the [CLS] held
  # at its old value, the new weights give the old logits.
  later = _perturbed(params, f"blocks_{layer}")
  out2, _ = run(later)
  assert np.abs(np.asarray(out2["mim_logits_c"] - out["mim_logits_c"])).max() > 1e-3
  np.testing.assert_array_equal(out2["hidden"][layer - 1], out["hidden"][layer - 1])
  held = _apply(
    model,
    later,
    out["hidden"][KW["depth"] - 1][:, :1],
    out2["hidden"][layer - 1][:, 1:],
    method=vit.VisionTransformer.patch_aggregation_logits,
  )
  np.testing.assert_allclose(held, out["mim_logits_c"], atol=1e-6)
  # A block up to `layer` changes the aggregated patches themselves.
  earlier = _perturbed(params, f"blocks_{layer - 1}")
  out3, _ = run(earlier)
  assert np.abs(np.asarray(out3["hidden"][layer - 1] - out["hidden"][layer - 1])).max() > 1e-3


def test_decoder_continues_the_layer_numbering_and_shares_norm_head_and_bias():
  images, mask = _inputs()
  b12 = vit.VisionTransformer(**dict(KW, depth=12), drop_path_rate=0.1, patch_aggregation_layer=9)
  bound = b12.bind(jax.eval_shape(b12.init, jax.random.key(0), images, mask))
  # unilm: layer ids early_layers + j + 1, rates linspace(0, 0.1, max(12, 11))[9 + j].
  rates = np.linspace(0, 0.1, 12)
  assert [b.layer_id for b in bound.cls_pt_layers] == [10, 11]
  np.testing.assert_allclose([b.drop_path_rate for b in bound.cls_pt_layers], rates[9:11])
  assert [b.drop_path_rate for b in bound.blocks] == pytest.approx(list(rates))
  deep = vit.VisionTransformer(
    **dict(KW, depth=4), drop_path_rate=0.1, patch_aggregation_layer=4, patch_aggregation_depth=3
  )
  bound = deep.bind(jax.eval_shape(deep.init, jax.random.key(0), images, mask))
  assert [b.layer_id for b in bound.cls_pt_layers] == [5, 6, 7]
  np.testing.assert_allclose(
    [b.drop_path_rate for b in bound.cls_pt_layers], np.linspace(0, 0.1, 7)[4:]
  )
  model = vit.VisionTransformer(**KW, patch_aggregation_layer=2)
  params = _random(_init(model))
  # No norm, head or relative position table of its own.
  assert not any(
    k.startswith("cls_pt_") and k not in ("cls_pt_layers_0", "cls_pt_layers_1") for k in params
  )
  assert "relative_position_bias_table" not in params["cls_pt_layers_0"]["attn"]
  # The shared bias is used by the decoder: changing it changes L_MIM^c with the
  # backbone's inputs to the decoder held fixed.
  out = _apply(model, params, images, mask, return_hidden=(1, 3))
  args = (out["hidden"][3][:, :1], out["hidden"][1][:, 1:])
  moved = dict(
    params,
    rel_pos_bias={
      "relative_position_bias_table": params["rel_pos_bias"]["relative_position_bias_table"]
      + 1.0 * np.arange(params["rel_pos_bias"]["relative_position_bias_table"].shape[0])[:, None]
    },
  )
  a = _apply(model, params, *args, method=vit.VisionTransformer.patch_aggregation_logits)
  b = _apply(model, moved, *args, method=vit.VisionTransformer.patch_aggregation_logits)
  assert np.abs(np.asarray(a - b)).max() > 1e-3


def test_bad_settings_are_one_line_errors():
  images, mask = _inputs()
  # The model names its attributes (plain ValueErrors); the config check, its fields.
  for kw, match in [
    (
      dict(patch_aggregation_layer=5),
      r"^VisionTransformer: patch_aggregation_layer 5 is not in 1..4",
    ),
    (
      dict(patch_aggregation_layer=2, patch_aggregation_depth=0),
      r"^VisionTransformer: patch_aggregation_depth 0 is not >= 1",
    ),
    (
      dict(patch_aggregation_layer=2, vocab_size=0, num_classes=3),
      r"^VisionTransformer: patch aggregation needs the MIM head and no "
      r"classifier \(vocab_size > 0, num_classes 0\), not vocab_size 0, "
      r"num_classes 3",
    ),
  ]:
    with pytest.raises(ValueError, match=match) as e:
      vit.VisionTransformer(**dict(KW, **kw)).init(jax.random.key(0), images, mask)
    assert not isinstance(e.value, ConfigError), e.value
  config = _v2_config()
  config.model.patch_aggregation.layer = 3  # tiny_config has 2 blocks
  with pytest.raises(ConfigError, match=r"^model.patch_aggregation.layer=3 must be in 1..2"):
    trainers.validate_config(config)
  for value, match in [
    (dict(layer=1), r"^model.patch_aggregation has fields \['layer'\]"),
    (dict(layer=1, depth=0), r"^model.patch_aggregation.depth=0 is invalid"),
    (dict(layer=1.5, depth=2), r"^model.patch_aggregation.layer=1.5 is inv"),
    (9, r"^model.patch_aggregation=9 is invalid; accepted: None"),
  ]:
    with config.ignore_type():
      config.model.patch_aggregation = value
    with pytest.raises(ConfigError, match=match):
      trainers.validate_config(config)


def _v2_config():
  config = tiny_config()
  config.model.patch_aggregation = dict(layer=1, depth=2)
  config.input.mask.exact = True
  return config


def test_both_v2_losses_fall_on_a_tiny_run():
  config = _v2_config()
  trainers.validate_config(config)
  config.optim.update(dict(warmup_steps=0, lr=3e-3))

  # A stand-in tokenizer (the step only calls `tokenize`): a fixed function of each
  # 8x8 patch's mean colour, so the targets can be learnt (a dVAE's init costs a minute).
  def tokenize(w, images):
    pooled = images.reshape(images.shape[0], 4, 8, 4, 8, 3).mean((2, 4))  # [B, 4, 4, 3]
    return jnp.argmax(pooled @ w, -1).astype(jnp.int32)

  tokenizer = types.SimpleNamespace(tokenize=tokenize)
  tok_params = jnp.asarray(
    np.random.default_rng(2).normal(size=(3, config.tokenizer.vocab_size)), jnp.float32
  )
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  built = runner.setup(
    config, mim.make_task(config, frozen={"tokenizer": (tokenizer, tok_params)}), mesh
  )
  assert {"cls_pt_layers_0", "cls_pt_layers_1"} <= set(built.state.params)
  rng = np.random.default_rng(0)
  b, s = config.input.batch_size, config.input.image_size
  mask = np.zeros((b, N), bool)
  for i in range(b):
    mask[i, rng.choice(N, 6, replace=False)] = True
  batch = sharding.host_to_global(
    {
      "image": rng.normal(size=(b, s, s, 3)).astype(np.float32),
      "tokenizer_image": rng.uniform(size=(b, s, s, 3)).astype(np.float32),
      "mask": mask,
    },
    mesh,
  )
  state, history = built.state, []
  for _ in range(8):
    state, m = built.step(state, batch, built.frozen)
    history.append(jax.device_get(m))
  first, last = history[0], history[-1]
  for key in ("loss_mim", "loss_mim_c"):
    assert last[key] < 0.9 * first[key], (key, [float(h[key]) for h in history])
  for h in history:
    np.testing.assert_allclose(h["loss"], h["loss_mim"] + h["loss_mim_c"], rtol=1e-6)
    assert "mim_accuracy" in h and "mim_accuracy_c" in h
