"""Parameter paths as strings, the handle for decay masks and sharding rules."""


def path_str(path) -> str:
  """'blocks_0/attn/qkv/kernel' for a jax key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)
