"""Parameter paths as strings, the handle for decay masks and sharding rules.

A model module declares its weights' logical axes as `PARAM_AXES`: (pattern, axes) pairs,
`pattern` a regex of a weight's path below the model ('mlp/fc1/kernel'), `axes` one logical
name (or None) per dimension. `sharding.param_shardings` matches each pattern against the
end of a leaf's path at a name boundary, so a table also finds its weights in optimizer
states; a model holding another as a submodule composes that model's table with `nested`.
"""

from typing import Sequence

# (pattern, logical axes) pairs: a model's PARAM_AXES.
AxesTable = tuple[tuple[str, tuple[str | None, ...]], ...]


def path_str(path) -> str:
  """'blocks_0/attn/qkv/kernel' for a jax key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def nested(prefix: str, table: Sequence[tuple[str, tuple]]) -> AxesTable:
  """`table` (a model's PARAM_AXES) for that model held as the submodule(s) `prefix`, a
  regex of names, e.g. nested('encoder|decoder', vit.PARAM_AXES)."""
  return tuple((f"(?:{prefix})/(?:{pattern})", axes) for pattern, axes in table)
