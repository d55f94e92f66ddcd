"""A ViT's blocks scanned or unscanned, and conversion between the two for any tree.

Unscanned: one subtree per block, `blocks_<i>/...` (unilm's naming, what converters and
checkpoints of earlier versions hold). Scanned (`model.scan_layers`): one subtree
`blocks/...` whose leaves are the blocks' stacked along a leading [depth] axis. Params,
optimizer states (whose moments mirror the params) and abstract trees
(`jax.ShapeDtypeStruct`s with shardings) convert alike, so a checkpoint written in one
layout resumes in the other.
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from beit_jax.models.vit import SCANNED_BLOCKS

SCANNED, UNSCANNED = "scanned", "unscanned"
_BLOCK = re.compile(r"blocks_(\d+)")


def _is_unscanned(x) -> bool:
  return isinstance(x, dict) and "blocks_0" in x


def _is_scanned(x) -> bool:
  """A dict holding a ViT's scanned blocks (a Block has `norm1`; the dVAE's `blocks` not)."""
  return (
    isinstance(x, dict) and isinstance(x.get(SCANNED_BLOCKS), dict) and "norm1" in x[SCANNED_BLOCKS]
  )


def layout(tree: Any) -> str | None:
  """SCANNED, UNSCANNED, or None (a tree without ViT blocks)."""
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: _is_scanned(x) or _is_unscanned(x))
  if any(_is_scanned(x) for x in leaves):
    return SCANNED
  return UNSCANNED if any(_is_unscanned(x) for x in leaves) else None


def stacked_mask(tree: Any) -> Any:
  """`tree`'s structure with a bool per leaf: whether it is [depth, ...], a leaf anywhere
  below a scanned ViT's SCANNED_BLOCKS (params, and the optimizer state's mirrors of them)."""

  def mark(x):
    if not _is_scanned(x):
      return False  # a leaf
    return {
      k: jax.tree.map(lambda _: True, v) if k == SCANNED_BLOCKS else stacked_mask(v)
      for k, v in x.items()
    }

  return jax.tree.map(mark, tree, is_leaf=_is_scanned)


def _stack_leaves(leaves: list) -> Any:
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    sharding = first.sharding
    if isinstance(sharding, NamedSharding):
      sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype, sharding=sharding)
  return jnp.stack(leaves)


def _layer(leaf: Any, i: int) -> Any:
  """Layer i of a stacked leaf (an array, or a ShapeDtypeStruct without the layer axis)."""
  if isinstance(leaf, jax.ShapeDtypeStruct):
    sharding = leaf.sharding
    if isinstance(sharding, NamedSharding):
      sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
    return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype, sharding=sharding)
  return leaf[i]


def _stack_dict(d: dict) -> dict:
  ids = sorted(int(m.group(1)) for k in d if (m := _BLOCK.fullmatch(k)))
  if ids != list(range(len(ids))):
    raise ValueError(f"blocks {ids} are not 0..{len(ids) - 1}")
  blocks = [d[f"blocks_{i}"] for i in ids]
  out = {k: v for k, v in d.items() if not _BLOCK.fullmatch(k)}
  out[SCANNED_BLOCKS] = jax.tree.map(lambda *xs: _stack_leaves(list(xs)), *blocks)
  return out


def _unstack_dict(d: dict) -> dict:
  stacked = d[SCANNED_BLOCKS]
  out = {k: v for k, v in d.items() if k != SCANNED_BLOCKS}
  for i in range(jax.tree.leaves(stacked)[0].shape[0]):
    out[f"blocks_{i}"] = jax.tree.map(lambda x: _layer(x, i), stacked)  # pylint: disable=cell-var-from-loop
  return out


def stacked(tree: Any) -> Any:
  """`tree` with every dict of `blocks_<i>` subtrees in the scanned layout."""
  return jax.tree.map(
    lambda x: _stack_dict(x) if _is_unscanned(x) else x, tree, is_leaf=_is_unscanned
  )


def unstacked(tree: Any) -> Any:
  """`tree` with every scanned `blocks` subtree split into `blocks_<i>` ones."""
  return jax.tree.map(
    lambda x: _unstack_dict(x) if _is_scanned(x) else x, tree, is_leaf=_is_scanned
  )


def to_layout(tree: Any, target: str | None) -> Any:
  """`tree` converted to `target` (SCANNED or UNSCANNED; None: unchanged)."""
  if target is None or layout(tree) in (None, target):
    return tree
  return stacked(tree) if target == SCANNED else unstacked(tree)
