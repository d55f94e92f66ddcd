"""Loading weights into a model: the one place that reads a checkpoint's params.

`load_into(target, path)` is the entry point: the params of the beit-jax checkpoint at
`path` (a run's workdir, its checkpoints/ folder, a step folder, or a converter's output)
checked against and cast to `target` (the model's params or their abstract tree).

Modules: `read` (a checkpoint's params onto one host device), `cast` (names and shapes
checked, dtypes / shardings / blocks as the model's), `blocks` (a ViT's scanned or
unscanned blocks, and conversion of any tree between the two).
"""
import fnmatch
from typing import Any, Iterable

from absl import logging

from beit_jax.params import blocks  # pylint: disable=unused-import
from beit_jax.params.cast import cast
from beit_jax.params.read import read

# BEiT v2's patch-aggregation decoder: trained with the MIM loss, thrown away after it.
DECODER = "cls_pt_layers_*"


def _matches(name: str, patterns: Iterable[str]) -> bool:
  return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def load_into(target: Any, path: str, *, field: str = "init_from",
              drop: tuple[str, ...] = (), fresh: tuple[str, ...] = ()) -> Any:
  """The checkpoint's params at `path`, in `target`'s tree, dtypes, shardings and blocks.

  Top-level params matching a pattern of `drop` are ignored. Those matching `fresh` keep
  `target`'s values when the checkpoint has none of them (all or nothing: a partial set
  is a mismatch). Any other missing, unexpected or misshapen param is a ConfigError
  naming `field`.
  """
  loaded = {k: v for k, v in read(path).items() if not _matches(k, drop)}
  for pattern in fresh:
    names = [k for k in target if fnmatch.fnmatchcase(k, pattern)]
    absent = [k for k in names if k not in loaded]
    if names and len(absent) == len(names):
      logging.info("%s=%s has no %s; %s start from their init", field, path, pattern,
                   ", ".join(sorted(absent)))
      loaded = dict(loaded, **{k: target[k] for k in absent})
  return cast(target, loaded, field)
