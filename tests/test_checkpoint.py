"""Checkpoint round trip, `init_from` loading, and resuming at the right step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from beit_jax import checkpoint
from beit_jax import loop
from beit_jax import sharding
from beit_jax.errors import ConfigError


def _state(seed=0):
  params = {"dense": {"kernel": jax.random.normal(jax.random.key(seed), (4, 8)),
                      "bias": jnp.arange(8.0)}}
  tx = optax.adamw(1e-3)
  return loop.TrainState(step=jnp.array(7, jnp.int32), params=params,
                         opt_state=tx.init(params))


def test_round_trip_keeps_every_leaf_and_the_meta(tmp_path):
  state = _state()
  mesh = sharding.make_mesh({"data": -1})
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  manager = checkpoint.make_manager(str(tmp_path), every_steps=1, keep=2)
  checkpoint.save(manager, 7, state, {"skipped_images": {"undecodable": 3}})
  manager.wait_until_finished()
  restored, start, meta = loop.restore_or_keep(manager, _state(seed=1), shardings)
  assert start == 7 and meta["skipped_images"] == {"undecodable": 3}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(checkpoint.load_params(str(tmp_path))["dense"]["kernel"],
                                state.params["dense"]["kernel"])


def test_keep_n_and_interval(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path), every_steps=2, keep=2)
  for step in range(1, 8):
    checkpoint.save(manager, step, _state())
  manager.wait_until_finished()
  assert manager.all_steps() == [4, 6]
  assert checkpoint.load_params(str(tmp_path / "checkpoints" / "4"))["dense"]["bias"][3] == 3


def test_missing_checkpoint_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match="no beit-jax checkpoint"):
    checkpoint.load_params(str(tmp_path))


def test_unwritable_workdir_is_a_config_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ConfigError, match="workdir=.*not writable"):
    checkpoint.check_writable(str(blocker / "run"))
