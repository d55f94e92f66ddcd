"""Non-finite steps are skipped without touching params or optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from beit_jax.training import train_state


def test_non_finite_step_changes_nothing_and_is_counted():
  tx = optax.adamw(0.1)
  params = {"w": jnp.ones((3,))}
  state = train_state.TrainState(
    step=jnp.array(0), params=params, opt_state=tx.init(params), bad_steps=jnp.array(0)
  )
  good = {"w": jnp.array([1.0, -1.0, 0.5])}
  bad = {"w": jnp.array([1.0, jnp.nan, 0.5])}
  apply = jax.jit(lambda s, g, l: train_state.apply_gradients(s, g, l, tx))

  s1, m1 = apply(state, bad, jnp.array(1.0))
  assert int(s1.step) == 1 and int(s1.bad_steps) == 1 and float(m1["skipped_steps"]) == 1
  for a, b in zip(
    jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((s1.params, s1.opt_state))
  ):
    np.testing.assert_array_equal(a, b)
  s2, _ = apply(s1, good, jnp.array(jnp.inf))  # a non-finite loss alone also skips
  assert int(s2.bad_steps) == 2
  np.testing.assert_array_equal(s2.params["w"], params["w"])
  s3, m3 = apply(s2, good, jnp.array(1.0))
  assert int(s3.bad_steps) == 0 and float(m3["skipped_steps"]) == 0
  assert not np.array_equal(s3.params["w"], params["w"])
