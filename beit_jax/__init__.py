"""beit-jax: BEiT pretraining (masked image modeling over visual tokens) in JAX/Flax.

The Python API (docs/api.md) at the top: `beit_jax.load`, `beit_jax.train`,
`beit_jax.make_mask`, `beit_jax.example_images`, `beit_jax.Model`.
"""

# Loaded at the first use of one of these names (PEP 562): `import beit_jax` and every
# `python -m beit_jax.X` stay cheap, with no JAX, Flax or model imported for them.
_API = ("Model", "example_images", "load", "load_config", "make_mask", "train")
__all__ = list(_API)


def __getattr__(name: str):
  if name in _API:
    from beit_jax import api  # pylint: disable=g-import-not-at-top

    return getattr(api, name)
  raise AttributeError(f"module 'beit_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(list(globals()) + list(_API))
