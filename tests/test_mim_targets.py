"""`mim_target='pixels'`: the papers' pixel-regression ablation of MIM (trainers/mim.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beit_jax.training import runner
from beit_jax.training import sharding
from beit_jax import trainers
from beit_jax.errors import ConfigError
from beit_jax.trainers import mim
from beit_jax.training import mim_objective
from tests.tiny_config import tiny_config


def test_patch_pixels_are_each_patch_normalised_in_raster_order():
  images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  got = np.asarray(mim_objective.patch_pixels(jnp.asarray(images), 4))  # [2, 4, 48]
  assert got.shape == (2, 4, 48)
  for i, (r, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):  # patch i: row r, column c
    patch = images[:, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].reshape(2, -1)
    want = (patch - patch.mean(1, keepdims=True)) / np.sqrt(patch.var(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got[:, i], want, rtol=1e-5, atol=1e-5)


def test_pixel_loss_is_the_mse_of_exactly_the_masked_positions():
  rng = np.random.default_rng(1)
  pred, target = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
  weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  loss, metrics = mim_objective.pixel_loss(
    jnp.asarray(pred), jnp.asarray(target), jnp.asarray(weights)
  )
  se = ((pred - target) ** 2).mean(-1)
  np.testing.assert_allclose(float(loss), (se[0, 0] + se[0, 1] + se[1, 0]) / 3, rtol=1e-6)
  assert float(metrics["masked_per_image"]) == 1.5


def _pixel_config():
  config = tiny_config()
  config.mim_target = "pixels"
  return config


def test_a_pixel_run_needs_no_tokenizer_and_its_loss_falls():
  config = _pixel_config()
  trainers.validate_config(config)
  assert mim.prerequisites(config, "/tmp/w") == []  # no stage 1
  config.input.tokenizer_image_size = 24  # no token grid to match
  trainers.validate_config(config)
  model = mim_objective.make_model(config)
  assert model.vocab_size == 8 * 8 * 3  # the head regresses one patch's pixels
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  built = runner.setup(config, mim.make_task(config), mesh)  # pixels: no tokenizer
  rng = np.random.default_rng(0)
  b = config.input.batch_size
  mask = np.zeros((b, 16), bool)
  mask[:, :6] = True
  batch = sharding.host_to_global(
    {"image": rng.normal(size=(b, 32, 32, 3)).astype(np.float32), "mask": mask}, mesh
  )
  state, losses = built.state, []
  for _ in range(4):  # the same batch: the regression must fit it
    state, m = built.step(state, batch, built.frozen)
    losses.append(float(m["loss"]))
  assert "mim_accuracy" not in m and "majority_baseline" not in m
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_an_unknown_target_is_one_line():
  config = _pixel_config()
  config.mim_target = "features"
  with pytest.raises(ConfigError, match=r"^mim_target='features' is invalid; accepted: one of"):
    trainers.validate_config(config)
