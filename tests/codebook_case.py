"""One batch of codebook updates (EMA, k-means init, restart, usage), run by one device, or
jitted on the batch sharded over 8 devices of one process or 2 processes
(tests/two_process_codebook.py), as the VQ-KD trainer's step runs them."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from beit_jax.models import vqkd

K, C = 16, 8


def inputs():
  """(codebook state, z [96, C] unit rows, their nearest codes, a key)."""
  rng = np.random.default_rng(3)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  z = jnp.asarray(unit(rng.normal(size=(8 * 12, C))), jnp.float32)  # 12 per device
  state = {
    "embedding": jnp.asarray(unit(rng.normal(size=(K, C))), jnp.float32),
    "cluster_size": jnp.asarray(rng.uniform(0, 3, size=K), jnp.float32),
    "initted": jnp.asarray(True),
  }
  return state, z, vqkd.nearest_code(z, state["embedding"]), jax.random.key(4)


def sharded(mesh):
  """`wrap` for `run_all`: fn jitted with its batch arguments sharded over 'data'."""

  def wrap(fn, specs):
    return jax.jit(
      fn,
      in_shardings=tuple(NamedSharding(mesh, s) for s in specs),
      out_shardings=NamedSharding(mesh, P()),
    )

  return wrap


def run_all(wrap, state, z, codes, key) -> dict:
  """Each update; `wrap(fn, in_specs)` runs fn on arguments sharded as `in_specs` (the
  identity: one device)."""
  fresh = dict(state, initted=jnp.asarray(False))
  dead = dict(state, cluster_size=state["cluster_size"].at[::2].set(0.0))
  return {
    "ema": wrap(vqkd.ema_update, (P(), P("data"), P("data")))(state, z, codes),
    "init": wrap(vqkd.init_codebook, (P(), P("data"), P()))(fresh, z, key),
    "restart": wrap(vqkd.restart_dead_codes, (P(), P("data"), P()))(dead, z, key),
    "usage": wrap(vqkd.codebook_usage, (P(), P("data")))(state, codes),
  }


def flat(results: dict) -> dict:
  return {
    f"{name}/{jax.tree_util.keystr(path)}": leaf
    for name, tree in results.items()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }
