"""A tiny MIM step's pieces the step tests share: a batch with uneven masks, and the step
built against a randomly initialised dVAE."""

import jax
import jax.numpy as jnp
import numpy as np

from beit_jax import tokenizers
from beit_jax.trainers import mim
from beit_jax.training import runner


def batch(config, seed=0) -> dict[str, np.ndarray]:
  """`config.input.batch_size` images with 1 to 6 masked patches each (unequal counts)."""
  rng = np.random.default_rng(seed)
  b, s, t = config.input.batch_size, config.input.image_size, config.input.tokenizer_image_size
  n = (s // config.input.patch_size) ** 2
  mask = np.zeros((b, n), bool)
  for i in range(b):
    mask[i, rng.choice(n, rng.integers(1, 7), replace=False)] = True
  return {
    "image": rng.normal(size=(b, s, s, 3)).astype(np.float32),
    "tokenizer_image": rng.uniform(size=(b, t, t, 3)).astype(np.float32),
    "mask": mask,
  }


def setup(config, mesh) -> runner.Setup:
  """`runner.setup` of the MIM task of `config` on `mesh`, its tokenizer a random dVAE."""
  tokenizer = tokenizers.build(config.tokenizer)
  t = config.input.tokenizer_image_size
  tok_params = tokenizer.model.init(
    {"params": jax.random.key(1), "gumbel": jax.random.key(2)},
    jnp.zeros((1, t, t, 3)),
    temperature=1.0,
  )["params"]
  return runner.setup(
    config, mim.make_task(config, frozen={"tokenizer": (tokenizer, tok_params)}), mesh
  )
