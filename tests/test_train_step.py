"""The MIM train step: loss definition, and sharding that changes nothing but speed."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from beit_jax import runner
from beit_jax import sharding
from beit_jax import tokenizers
from beit_jax.trainers import mim
from tests.tiny_config import tiny_config


def test_mim_loss_is_mean_over_exactly_the_masked_positions():
  rng = np.random.default_rng(0)
  b, n, v, k = 3, 16, 10, 8
  mask = np.zeros((b, n), bool)
  for i, count in enumerate([1, 5, 8]):  # different counts per image
    mask[i, rng.choice(n, count, replace=False)] = True
  logits_all = jnp.asarray(rng.normal(size=(b, n, v)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, v, size=(b, n)), jnp.int32)
  positions, weights = mim.masked_positions(jnp.asarray(mask), k)
  logits = jnp.take_along_axis(logits_all, positions[..., None], 1)
  targets = jnp.take_along_axis(tokens, positions, 1)
  loss, metrics = mim.mim_loss(logits, targets, weights)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_all, tokens)
  np.testing.assert_allclose(loss, ce[mask].mean(), rtol=1e-6)
  assert float(metrics["masked_per_image"]) == pytest.approx(14 / 3)
  correct = (jnp.argmax(logits_all, -1) == tokens)[mask].mean()
  np.testing.assert_allclose(metrics["mim_accuracy"], correct, rtol=1e-6)


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, s, t = config.input.batch_size, config.input.image_size, config.input.tokenizer_image_size
  n = (s // config.input.patch_size) ** 2
  mask = np.zeros((b, n), bool)
  for i in range(b):
    mask[i, rng.choice(n, rng.integers(1, 7), replace=False)] = True
  return {"image": rng.normal(size=(b, s, s, 3)).astype(np.float32),
          "tokenizer_image": rng.uniform(size=(b, t, t, 3)).astype(np.float32),
          "mask": mask}


def _setup(config, mesh):
  tokenizer = tokenizers.build(config.tokenizer)
  t = config.input.tokenizer_image_size
  tok_params = tokenizer.model.init({"params": jax.random.key(1), "gumbel": jax.random.key(2)},
                                    jnp.zeros((1, t, t, 3)), temperature=1.0)["params"]
  return runner.setup(config, mim.make_task(config, tokenizer=tokenizer, tok_params=tok_params),
                      mesh)


def _two_steps(config, mesh):
  built = _setup(config, mesh)
  state, step, tok_params = built.state, built.step, built.frozen
  metrics = []
  for seed in range(2):
    batch = sharding.host_to_global(_batch(config, seed), mesh)
    state, m = step(state, batch, tok_params)
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


@pytest.mark.parametrize("mesh_cfg", [dict(data=8), dict(data=2, fsdp=4)])
def test_sharded_step_equals_single_device_step(mesh_cfg):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  config = tiny_config()
  config.model.drop_path_rate = 0.1  # the per-example randomness must match too
  single, m1 = _two_steps(config, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  sharded, m8 = _two_steps(config, sharding.make_mesh(mesh_cfg))
  assert int(sharded.step) == 2
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(single.params),
                          jax.tree.leaves(sharded.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  # The step did train: parameters moved away from the initial ones.
  init = _setup(config, sharding.make_mesh({"data": 1}, jax.devices()[:1])).state
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(init.params), jax.tree.leaves(sharded.params))]
  assert max(moved) > 0


def test_fsdp_mesh_really_shards_parameters():
  config = tiny_config()
  mesh = sharding.make_mesh(dict(data=2, fsdp=4))
  state = _setup(config, mesh).state
  fc1 = state.params["blocks_0"]["mlp"]["fc1"]["kernel"]  # [32, 64]
  assert fc1.sharding.spec != jax.sharding.PartitionSpec()
  assert fc1.addressable_shards[0].data.size == fc1.size // 4
