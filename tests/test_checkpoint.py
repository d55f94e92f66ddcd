"""Checkpoint round trip, `init_from` loading, and resuming at the right step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from beit_jax.training import checkpoint
from beit_jax import params as params_lib
from beit_jax.training import runner
from beit_jax.training import train_state
from beit_jax.training import sharding
from beit_jax.errors import ConfigError


def _state(seed=0):
  params = {
    "dense": {"kernel": jax.random.normal(jax.random.key(seed), (4, 8)), "bias": jnp.arange(8.0)}
  }
  tx = optax.adamw(1e-3)
  return train_state.TrainState(
    step=jnp.array(7, jnp.int32),
    params=params,
    opt_state=tx.init(params),
    bad_steps=jnp.array(0, jnp.int32),
  )


def test_round_trip_keeps_every_leaf_and_the_meta(tmp_path):
  state = _state()
  mesh = sharding.make_mesh({"data": -1})
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  manager = checkpoint.make_manager(str(tmp_path), every_steps=1, keep=2)
  checkpoint.save(manager, 7, state, {"skipped_images": {"undecodable": 3}})
  manager.wait_until_finished()
  restored, start, meta = runner.restore_or_keep(manager, _state(seed=1), shardings)
  assert start == 7 and meta["skipped_images"] == {"undecodable": 3}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(
    params_lib.read(str(tmp_path))["dense"]["kernel"], state.params["dense"]["kernel"]
  )


def test_keep_n_and_interval(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path), every_steps=2, keep=2)
  for step in range(1, 8):
    checkpoint.save(manager, step, _state())
  manager.wait_until_finished()
  assert manager.all_steps() == [4, 6]
  assert params_lib.read(str(tmp_path / "checkpoints" / "4"))["dense"]["bias"][3] == 3


def test_missing_checkpoint_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match="no beit-jax checkpoint"):
    params_lib.read(str(tmp_path))


def test_unwritable_workdir_is_a_config_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ConfigError, match="workdir=.*not writable"):
    checkpoint.check_writable(str(blocker / "run"))


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(tmp_path):
  mesh = sharding.make_mesh({"data": -1})
  manager = checkpoint.make_manager(str(tmp_path), every_steps=1, keep=3)
  checkpoint.save(manager, 1, _state(seed=1))
  checkpoint.save(manager, 2, _state(seed=2))
  manager.wait_until_finished()
  for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncated, as by a full disk
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), _state())
  restored, start, _ = runner.restore_or_keep(manager, _state(seed=9), shardings)
  assert start == 1
  np.testing.assert_array_equal(
    restored.params["dense"]["kernel"], _state(seed=1).params["dense"]["kernel"]
  )
  assert (tmp_path / "checkpoints" / "2.unreadable").exists()
  assert manager.all_steps() == [1]
  checkpoint.save(manager, 2, _state(seed=3))  # the run goes on from there
  manager.wait_until_finished()
  assert manager.all_steps() == [1, 2]


def _vit_state():
  """A ViT block's attention params and their Adam moments: qkv [D, 3, D] = [4, 3, 4]."""
  params = {
    "blocks_0": {
      "attn": {
        "qkv": {"kernel": jax.random.normal(jax.random.key(0), (4, 3, 4))},
        "q_bias": jnp.arange(4.0),
      }
    }
  }
  tx = optax.adam(1e-3)
  opt_state = jax.tree.map(lambda x: x + 1.0, tx.init(params))  # moments != 0
  return train_state.TrainState(
    step=jnp.array(5, jnp.int32),
    params=params,
    opt_state=opt_state,
    bad_steps=jnp.array(0, jnp.int32),
  )


def test_a_checkpoint_with_a_fused_qkv_is_refused_with_its_shapes(tmp_path):
  """A [D, 3D] qkv kernel (unilm's fused layout, only the converters read it) does not fit
  the model's [D, 3, D]: loading names the shapes instead of failing in a trace."""
  state = _vit_state()
  fused = jax.tree_util.tree_map_with_path(
    lambda p, x: x.reshape(4, 12) if "qkv" in jax.tree_util.keystr(p) else x, state.params
  )
  checkpoint.save_params(str(tmp_path), fused)
  loaded = params_lib.read(str(tmp_path))
  with pytest.raises(ConfigError, match=r"init_from: .*qkv/kernel: \(4, 12\) vs \(4, 3, 4\)"):
    params_lib.cast(state.params, loaded, "init_from")
