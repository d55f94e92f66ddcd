"""The MIM train step: loss definition, and sharding that changes nothing but speed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from beit_jax.training import sharding
from beit_jax.errors import ConfigError
from beit_jax.training import mim_objective
from tests import mim_step
from tests.tiny_config import tiny_config


def test_mim_loss_is_mean_over_exactly_the_masked_positions():
  rng = np.random.default_rng(0)
  b, n, v, k = 3, 16, 10, 8
  mask = np.zeros((b, n), bool)
  for i, count in enumerate([1, 5, 8]):  # different counts per image
    mask[i, rng.choice(n, count, replace=False)] = True
  logits_all = jnp.asarray(rng.normal(size=(b, n, v)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, v, size=(b, n)), jnp.int32)
  positions, weights = mim_objective.masked_positions(jnp.asarray(mask), k)
  logits = jnp.take_along_axis(logits_all, positions[..., None], 1)
  targets = jnp.take_along_axis(tokens, positions, 1)
  loss, metrics = mim_objective.mim_loss(logits, targets, weights)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_all, tokens)
  np.testing.assert_allclose(loss, ce[mask].mean(), rtol=1e-6)
  assert float(metrics["masked_per_image"]) == pytest.approx(14 / 3)
  correct = (jnp.argmax(logits_all, -1) == tokens)[mask].mean()
  np.testing.assert_allclose(metrics["mim_accuracy"], correct, rtol=1e-6)


def _two_steps(config, mesh):
  """(final state on the host, per-step metrics, the fraction of all parameter bytes one
  device holds)."""
  built = mim_step.setup(config, mesh)
  state, step, frozen = built.state, built.step, built.frozen
  leaves = jax.tree.leaves(state.params)
  held = sum(x.addressable_shards[0].data.nbytes for x in leaves) / sum(x.nbytes for x in leaves)
  metrics = []
  for seed in range(2):
    batch = sharding.host_to_global(mim_step.batch(config, seed), mesh)
    state, m = step(state, batch, frozen)
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics, held


# (mesh, the bounds of the fraction of the parameter bytes one device holds): data parallel
# holds everything; fsdp and fsdp x tensor about 1/8 (the few weights no axis divides
# whole); tensor alone halves the matrices the heads, MLP units and vocabulary split.
LAYOUTS = {
  "data": (dict(data=8), 1.0, 1.0),
  "fsdp": (dict(fsdp=8), 0.12, 0.2),
  "fsdp+tensor": (dict(fsdp=4, tensor=2), 0.12, 0.2),
  "data+tensor": (dict(data=4, tensor=2), 0.5, 0.7),
  "2 slices x fsdp+tensor": (dict(slice=2, fsdp=2, tensor=2), 0.24, 0.4),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_step_equals_single_device_step(layout):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  mesh_cfg, low, high = LAYOUTS[layout]
  config = tiny_config()
  config.model.drop_path_rate = 0.1  # the per-example randomness must match too
  config.sharding.min_size = 0  # the tiny model's weights are all below the default
  single, m1, _ = _two_steps(config, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  sharded, m8, held = _two_steps(config, sharding.make_mesh(mesh_cfg))
  assert low <= held <= high, f"one device holds {held:.3f} of the parameter bytes"
  assert int(sharded.step) == 2
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(single.params), jax.tree.leaves(sharded.params)
  ):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  # The step did train: parameters moved away from the initial ones.
  init = mim_step.setup(config, sharding.make_mesh({"data": 1}, jax.devices()[:1])).state
  moved = [
    np.abs(np.asarray(a) - np.asarray(b)).max()
    for a, b in zip(jax.tree.leaves(init.params), jax.tree.leaves(sharded.params))
  ]
  assert max(moved) > 0


def test_weights_shard_by_their_role_and_small_ones_stay_whole():
  config = tiny_config()
  config.sharding.min_size = 500
  mesh = sharding.make_mesh(dict(fsdp=4, tensor=2))
  specs = jax.tree.map(lambda x: x.sharding.spec, mim_step.setup(config, mesh).state.params)
  block = specs["blocks_0"]
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  assert block["attn"]["qkv"]["kernel"] == P("fsdp", None, "tensor")  # [D, 3, heads]
  assert block["attn"]["proj"]["kernel"] == P("tensor", "fsdp")
  assert block["mlp"]["fc1"]["kernel"] == P("fsdp", "tensor")
  assert block["mlp"]["fc2"]["kernel"] == P("tensor", "fsdp")
  assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
  assert block["mlp"]["fc1"]["bias"] == P()  # 64 elements < min_size
  # 228 x 2 < min_size; it would shard its 228 rows over fsdp (no role: by size alone)
  assert specs["rel_pos_bias"]["relative_position_bias_table"] == P()


def test_the_step_constrains_activations_to_the_mesh():
  config = tiny_config()
  mesh = sharding.make_mesh(dict(fsdp=4, tensor=2))
  built = mim_step.setup(config, mesh)
  batch = sharding.host_to_global(mim_step.batch(config), mesh)
  text = built.step.lower(built.state, batch, built.frozen).as_text()
  constraints = [line for line in text.splitlines() if "sharding_constraint" in line]
  batch_axes = '{"slice", "data", "fsdp"}'
  # The residual stream [B, T, D] (batch split, D whole), per head [B, T, H, hd] (heads
  # over tensor) and the MLP's hidden units [B, T, M] (over tensor).
  for spec, shape in [
    (f"[{batch_axes}, {{}}, {{}}]", "8x17x32xf32"),
    (f'[{batch_axes}, {{}}, {{"tensor"}}, {{}}]', "8x17x2x16xf32"),
    (f'[{batch_axes}, {{}}, {{"tensor"}}]', "8x17x64xf32"),
  ]:
    assert any(spec in line and shape in line for line in constraints), (spec, constraints)


def test_a_head_count_the_tensor_axis_does_not_divide_is_a_config_error():
  config = tiny_config()
  config.mesh.tensor = 4  # tiny_config has 2 heads
  with pytest.raises(ConfigError, match=r"mesh.tensor=4 must divide model.num_heads=2"):
    sharding.check_tensor_split(config.model, config.mesh)


def test_slices_are_the_outer_axis_of_consecutive_devices_on_one_host():
  mesh = sharding.make_mesh(dict(slice=2, fsdp=4))
  assert dict(mesh.shape) == dict(slice=2, data=1, fsdp=4, tensor=1)
  assert [d.id for d in mesh.devices[0].ravel()] == [0, 1, 2, 3]
  assert [d.id for d in mesh.devices[1].ravel()] == [4, 5, 6, 7]
