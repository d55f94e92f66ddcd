"""Schedule values and the weight-decay mask (docs/reference.md §4)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from beit_jax.training import optim
from beit_jax.errors import ConfigError


def test_schedule_warmup_and_cosine_end_points():
  s = optim.lr_schedule(1.5e-3, total_steps=1000, warmup_steps=100, min_lr=1e-5)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(50)), 0.75e-3, rtol=1e-6)
  np.testing.assert_allclose(float(s(100)), 1.5e-3, rtol=1e-6)
  # Half-way through the cosine part: the mean of peak and floor.
  np.testing.assert_allclose(float(s(550)), (1.5e-3 + 1e-5) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(s(1000)), 1e-5, rtol=1e-5)
  values = np.array([float(s(i)) for i in range(100, 1001, 50)])
  assert np.all(np.diff(values) <= 0)


def test_decay_mask_follows_beit_rules():
  params = {
    "cls_token": jnp.zeros((1, 1, 8)),
    "mask_token": jnp.zeros((1, 1, 8)),
    "pos_embed": jnp.zeros((1, 5, 8)),
    "patch_embed": {"kernel": jnp.zeros((2, 2, 3, 8)), "bias": jnp.zeros(8)},
    "rel_pos_bias": {"relative_position_bias_table": jnp.zeros((12, 2))},
    "blocks_0": {
      "gamma_1": jnp.zeros(8),
      "norm1": {"scale": jnp.zeros(8)},
      "attn": {"q_bias": jnp.zeros(8), "qkv": {"kernel": jnp.zeros((8, 24))}},
    },
  }
  mask = optim.weight_decay_mask(params)
  assert mask["cls_token"] is False and mask["pos_embed"] is False
  assert mask["mask_token"] is True  # unilm decays it
  assert mask["rel_pos_bias"]["relative_position_bias_table"] is True
  assert mask["patch_embed"] == {"kernel": True, "bias": False}
  assert mask["blocks_0"]["gamma_1"] is False
  assert mask["blocks_0"]["norm1"]["scale"] is False
  assert mask["blocks_0"]["attn"] == {"q_bias": False, "qkv": {"kernel": True}}


def _optim_cfg(**kw):
  base = dict(lr=1e-2, min_lr=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.5, grad_clip=0.0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_weight_decay_applies_only_where_masked():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  tx, _ = optim.make_optimizer(_optim_cfg(), total_steps=10, warmup_steps=0)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # With zero gradients only decoupled decay moves parameters: -lr * wd * p.
  np.testing.assert_allclose(updates["w"], -1e-2 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["b"], 0.0)


def test_grad_clip_bounds_the_update_direction():
  params = {"w": jnp.zeros(4)}
  tx, _ = optim.make_optimizer(
    _optim_cfg(weight_decay=0.0, grad_clip=1.0, b1=0.0, b2=0.0, eps=0.0),
    total_steps=10,
    warmup_steps=0,
  )
  g = {"w": jnp.array([30.0, 40.0, 0.0, 0.0])}
  state = tx.init(params)
  # Clipping comes before Adam: with b1=0 Adam's first moment is the clipped gradient.
  _, new_state = tx.update(g, state, params)
  mu = new_state[1].mu["w"]
  np.testing.assert_allclose(np.linalg.norm(mu), 1.0, rtol=1e-5)
  np.testing.assert_allclose(mu, np.array([0.6, 0.8, 0.0, 0.0]), rtol=1e-5)


def test_bad_values_name_the_field():
  with pytest.raises(ConfigError, match="optim.lr"):
    optim.make_optimizer(_optim_cfg(lr=0.0), total_steps=10, warmup_steps=0)
  with pytest.raises(ConfigError, match="total_steps"):
    optim.lr_schedule(1.0, total_steps=0, warmup_steps=0)


def test_one_builder_schedules_scales_and_frozen_keys():
  """`make_optimizer`'s knobs: the schedule kind, per-leaf lr scales, frozen top-level keys."""
  cfg = _optim_cfg(weight_decay=0.0, power=1.0)
  poly_tx, poly = optim.make_optimizer(cfg, total_steps=10, warmup_steps=0, schedule="poly")
  np.testing.assert_allclose(float(poly(5)), 1e-2 * 0.5, rtol=1e-6)
  _, cosine = optim.make_optimizer(cfg, total_steps=10, warmup_steps=0)
  np.testing.assert_allclose(float(cosine(5)), 1e-2 * 0.5, rtol=1e-6)
  assert float(poly(2)) != float(cosine(2))
  with pytest.raises(ValueError, match="schedule='step'"):
    optim.make_optimizer(cfg, total_steps=10, warmup_steps=0, schedule="step")

  params = {
    "train": {"w": jnp.ones((2, 2))},
    "frozen": {"w": jnp.ones((2, 2))},
    "codebook": {"e": jnp.ones((3, 2))},
  }
  grads = jax.tree.map(jnp.ones_like, params)
  tx, schedule = optim.make_optimizer(
    _optim_cfg(),
    total_steps=10,
    warmup_steps=0,
    frozen=("codebook",),
    lr_scale_fn=lambda p: {k: jax.tree.map(lambda _: 0.5, v) for k, v in p.items()},
  )
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  # Frozen: no update, no Adam moments, no weight decay.
  np.testing.assert_array_equal(updates["codebook"]["e"], 0.0)
  assert not any(x.shape == (3, 2) for x in jax.tree.leaves(state))
  # Trained: Adam's first step is the gradient's sign, plus decay, times scale and lr.
  lr = float(schedule(0))
  np.testing.assert_allclose(updates["train"]["w"], -lr * 0.5 * (1.0 + 0.5), rtol=1e-5)
  np.testing.assert_allclose(updates["frozen"]["w"], updates["train"]["w"])
  with pytest.raises(ValueError, match="train"):
    optim.make_optimizer(_optim_cfg(), total_steps=10, warmup_steps=0, frozen=("train",))


def test_an_optimizer_group_anywhere_has_the_same_rules():
  assert [r[1:] for r in optim.rules("a.optim")] == [r[1:] for r in optim.rules("optim")]
  assert {f for f, _, _ in optim.rules("a.optim")} >= {"a.optim.lr", "a.optim.grad_clip"}
