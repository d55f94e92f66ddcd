"""One batch of codebook updates (EMA, k-means init, restart, usage), run by one device, 8
devices of one process, or 2 processes (tests/two_process_codebook.py) alike."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from beit_jax.models import vqkd

K, C = 16, 8


def inputs():
  """(codebook state, z [96, C] unit rows, their nearest codes, a key)."""
  rng = np.random.default_rng(3)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  z = jnp.asarray(unit(rng.normal(size=(8 * 12, C))), jnp.float32)  # 12 per device
  state = {'embedding': jnp.asarray(unit(rng.normal(size=(K, C))), jnp.float32),
           'cluster_size': jnp.asarray(rng.uniform(0, 3, size=K), jnp.float32),
           'initted': jnp.asarray(True)}
  return state, z, vqkd.nearest_code(z, state['embedding']), jax.random.key(4)


def run_all(wrap, state, z, codes, key, axis_name=None) -> dict:
  """Each update; `wrap(fn, in_specs)` maps fn over the batch axis (identity: one device)."""
  fresh = dict(state, initted=jnp.asarray(False))
  dead = dict(state, cluster_size=state['cluster_size'].at[::2].set(0.0))
  return {
      'ema': wrap(lambda s, z, c: vqkd.ema_update(s, z, c, axis_name=axis_name),
                  (P(), P('data'), P('data')))(state, z, codes),
      'init': wrap(lambda s, z, r: vqkd.init_codebook(s, z, r, axis_name=axis_name),
                   (P(), P('data'), P()))(fresh, z, key),
      'restart': wrap(lambda s, z, r: vqkd.restart_dead_codes(s, z, r, 1.0, axis_name),
                      (P(), P('data'), P()))(dead, z, key),
      'usage': wrap(lambda s, c: vqkd.codebook_usage(s, c, axis_name=axis_name),
                    (P(), P('data')))(state, codes),
  }


def flat(results: dict) -> dict:
  return {f"{name}/{jax.tree_util.keystr(path)}": leaf for name, tree in results.items()
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
