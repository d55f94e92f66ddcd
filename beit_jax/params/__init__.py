"""Loading weights into a model: the one place that reads a checkpoint's params.

`load_into(target, path)` is the entry point: the params of the beit-jax checkpoint at
`path` (a run's workdir, its checkpoints/ folder, a step folder, or a converter's output)
checked against and cast to `target` (the model's params or their abstract tree). Every
trainer's `init_from`, the visualizer and the tests load through it; `vit=ViTFit(...)`
adapts a ViT checkpoint to the ViT it starts (fine-tuning, probing, segmentation).

Modules: `read` (a checkpoint's params onto one host device), `cast` (names and shapes
checked, dtypes / shardings / blocks as the model's), `blocks` (a ViT's scanned or
unscanned blocks, and conversion of any tree between the two: a tree's "layout"), `vit` (a
ViT checkpoint adapted to another ViT: relative position bias, position tables, model
fields).
"""

import fnmatch
from typing import Any, Iterable

import jax
from absl import logging
from etils import epath
from flax import traverse_util

from beit_jax.errors import ConfigError
from beit_jax.params import blocks
from beit_jax.params.cast import cast
from beit_jax.params.read import read
from beit_jax.params import vit as vit_params
from beit_jax.params.vit import Fit as ViTFit

# BEiT v2's patch-aggregation decoder: trained with the MIM loss, thrown away after it.
DECODER = "cls_pt_layers_*"
# A classifier's own params: a pretraining checkpoint has none (or of another class count).
CLASSIFIER = ("fc_norm", "head")
# What a ViT checkpoint may hold that a model of another use has no place for: heads and
# final norms of another use, and v2's decoder.
OTHER_USES = ("lm_head", "norm", "fc_norm", "head", DECODER)

__all__ = [
  "CLASSIFIER",
  "DECODER",
  "OTHER_USES",
  "ViTFit",
  "blocks",
  "cast",
  "load_into",
  "read",
  "vit_params",
]


def _matches(name: str, patterns: Iterable[str]) -> bool:
  return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _top(key: str) -> str:
  return key.split("/")[0]


def _listing(names: list[str]) -> str:
  return f"{len(names)} parameters ({', '.join(names[:6])}" + (", ...)" if len(names) > 6 else ")")


def load_into(
  target: Any,
  path: str,
  *,
  field: str = "init_from",
  drop: tuple[str, ...] = (),
  fresh: tuple[str, ...] = (),
  vit: ViTFit | None = None,
) -> Any:
  """The checkpoint's params at `path`, in `target`'s tree, dtypes, shardings and blocks.

  Args:
    target: the model's params (or their abstract tree, when `fresh` is empty), scanned
      or unscanned blocks.
    path: a beit-jax checkpoint (a run's workdir, its checkpoints/ or a step folder, a
      converter's output).
    field: the config field that named `path`, for errors ("init_from=PATH: ...").
    drop: top-level names (fnmatch patterns) of checkpoint params the model may have no
      place for: those it lacks are left out (logged), not an error.
    fresh: top-level names (patterns) of the model's params that start from `target`'s
      values when the checkpoint has none of them or has them in other shapes (a head of
      another class count). A partial set is a mismatch.
    vit: a ViT checkpoint's arrangement made the model's first (`ViTFit`: relative
      position bias per block or shared, position tables resized); errors then name the
      `--config` flags of the checkpoint's model.

  Any other missing, unexpected or misshapen param is a ConfigError naming `field`.
  """
  what = f"{field}={path}"
  if not epath.Path(path).exists():
    raise ConfigError(f"{what} does not exist")
  loaded = vit_params.flat(read(path))
  source = None
  if vit is not None:
    loaded, source = vit_params.fit(loaded, path, what, vit)
  shapes = {
    k: tuple(v.shape)
    for k, v in traverse_util.flatten_dict(
      blocks.unstacked(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)),
      sep="/",
    ).items()
  }

  restarted = []
  for pattern in fresh:
    names = [k for k in shapes if fnmatch.fnmatchcase(_top(k), pattern)]
    present = [k for k in names if k in loaded]
    if names and (not present or any(tuple(loaded[k].shape) != shapes[k] for k in present)):
      restarted += names
      for k in present:
        del loaded[k]
  dropped = sorted(k for k in loaded if k not in shapes and _matches(_top(k), drop))
  for k in dropped:
    del loaded[k]

  missing = sorted(k for k in shapes if k not in loaded and k not in restarted)
  unexpected = sorted(k for k in loaded if k not in shapes)
  misshapen = [
    f"{k}: {tuple(loaded[k].shape)} vs {shapes[k]}"
    for k in sorted(loaded)
    if k in shapes and tuple(loaded[k].shape) != shapes[k]
  ]
  if missing or unexpected or misshapen:
    problems = (
      [f"the checkpoint lacks {_listing(missing)}"] * bool(missing)
      + [f"the model has no place for {_listing(unexpected)}"] * bool(unexpected)
      + [f"shape mismatches {misshapen[:6]}"] * bool(misshapen)
    )
    hint = (
      f"; set the model fields to the checkpoint's: {vit_params.config_flags(source)}"
      if source
      else ""
    )
    raise ConfigError(f"{what}: parameters do not fit the model: {'; '.join(problems)}{hint}")
  if dropped:
    logging.info("%s: not used: %s", what, ", ".join(dropped))
  if restarted:
    logging.info("%s: initialised from scratch: %s", what, ", ".join(restarted))
    values = traverse_util.flatten_dict(target, sep="/")
    if any(k not in values for k in restarted):  # a fresh param inside scanned blocks
      values = traverse_util.flatten_dict(blocks.unstacked(target), sep="/")
    loaded.update({k: values[k] for k in restarted})
  return cast(target, traverse_util.unflatten_dict(loaded, sep="/"), what)
