"""Loaded params checked against a model's (names and shapes) and cast to its dtypes,
shardings and scanned/unscanned blocks."""

from typing import Any

import jax
from flax import traverse_util

from beit_jax.errors import ConfigError
from beit_jax.params import blocks


def cast(target: Any, loaded: Any, field: str) -> Any:
  """`loaded` laid out like `target` (dtype and sharding), after checking names and shapes.

  Raises a ConfigError naming `field` and listing missing / unexpected parameters
  and shape mismatches, rather than failing inside a trace.
  """
  loaded = blocks.to_layout(loaded, blocks.layout(target))
  want = traverse_util.flatten_dict(target, sep="/")
  got = traverse_util.flatten_dict(loaded, sep="/")
  missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  shapes = [
    f"{k}: {tuple(got[k].shape)} vs {tuple(want[k].shape)}"
    for k in sorted(set(want) & set(got))
    if tuple(got[k].shape) != tuple(want[k].shape)
  ]
  if missing or unexpected or shapes:
    raise ConfigError(
      f"{field}: parameters do not fit the model: missing {missing[:8]}, "
      f"unexpected {unexpected[:8]}, shape mismatches {shapes[:8]}"
    )
  out = {
    k: jax.device_put(jax.numpy.asarray(got[k], want[k].dtype), want[k].sharding) for k in want
  }
  return traverse_util.unflatten_dict(out, sep="/")
