"""Patch masks for masked image modeling: BEiT's blockwise and random masks (docs/reference.md §2).

`make_mask_tf` is built from TF graph ops with stateless randomness only, so it runs inside a
`tf.data` map with parallel calls and gives the same mask for the same seed on every host and
every restart. `make_mask_np` is a plain NumPy transcription of unilm's `MaskingGenerator` that
serves as the reference the TF version is tested against.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
import numpy as np
from etils import epy

# Loaded at first use, by a tf.data pipeline: the compute path imports this module without TF.
with epy.lazy_imports():
  import tensorflow as tf

from beit_jax.errors import ConfigError

KINDS = ("blockwise", "random")
# unilm tries this many random blocks per step before concluding no block fits any more.
_ATTEMPTS = 10
_FIELD = "input.mask"


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """What mask to draw for one image.

  Attributes:
    kind: "blockwise" (BEiT Algorithm 1) or "random" (exactly `num_masking_patches` uniform
      patches, the ablation).
    grid: patch grid (rows, cols); masks are flattened row-major like the ViT's patches.
    num_masking_patches: target number of masked patches (75 of 196 in BEiT).
    min_num_patches: smallest block area drawn.
    max_num_patches: largest block area drawn; None means `num_masking_patches`.
    min_aspect: smallest block aspect ratio rows/cols.
    max_aspect: largest aspect ratio; None means 1 / min_aspect.
    exact: BEiT v2: after the blocks, add/remove single random patches to hit the target
      exactly ("random" masks always are exact).
  """

  kind: str = "blockwise"
  grid: tuple[int, int] = (14, 14)
  num_masking_patches: int = 75
  min_num_patches: int = 16
  max_num_patches: int | None = None
  min_aspect: float = 0.3
  max_aspect: float | None = None
  exact: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ConfigError(f"{_FIELD}.kind must be one of {KINDS}, got {self.kind!r}")
    if (
      not isinstance(self.grid, tuple)
      or len(self.grid) != 2
      or not all(_is_int(g) and g >= 1 for g in self.grid)
      or (self.kind == "blockwise" and min(self.grid) < 2)
    ):
      raise ConfigError(
        f"{_FIELD} grid (image size / patch size) must be two ints >= 1 "
        f"(>= 2 for blockwise masking), got {self.grid}"
      )
    n = self.grid[0] * self.grid[1]
    _check_int("num_masking_patches", self.num_masking_patches, 1, n)
    _check_int("min_num_patches", self.min_num_patches, 1, self.num_masking_patches)
    if self.max_num_patches is not None:
      _check_int(
        "max_num_patches", self.max_num_patches, self.min_num_patches, self.num_masking_patches
      )
    if not (isinstance(self.min_aspect, (int, float)) and self.min_aspect > 0):
      raise ConfigError(f"{_FIELD}.min_aspect must be a number > 0, got {self.min_aspect!r}")
    if self.max_aspect is not None and not (
      isinstance(self.max_aspect, (int, float)) and self.max_aspect >= self.min_aspect
    ):
      raise ConfigError(
        f"{_FIELD}.max_aspect must be None or a number >= min_aspect="
        f"{self.min_aspect}, got {self.max_aspect!r}"
      )
    if not isinstance(self.exact, bool):
      raise ConfigError(f"{_FIELD}.exact must be True or False, got {self.exact!r}")

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def block_cap(self) -> int:
    """Upper bound of the area drawn for one block."""
    return self.num_masking_patches if self.max_num_patches is None else self.max_num_patches

  @property
  def log_aspect_range(self) -> tuple[float, float]:
    max_aspect = 1 / self.min_aspect if self.max_aspect is None else self.max_aspect
    return math.log(self.min_aspect), math.log(max_aspect)


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_int(name: str, value, lo: int, hi: int):
  if not (_is_int(value) and lo <= value <= hi):
    raise ConfigError(f"{_FIELD}.{name} must be an int in [{lo}, {hi}], got {value!r}")


def mask_spec_from_config(cfg: ml_collections.ConfigDict, grid) -> MaskSpec:
  """Builds a MaskSpec from `config.input.mask`; fields it leaves out take the defaults."""
  fields = {f.name for f in dataclasses.fields(MaskSpec)} - {"grid"}
  given = dict(cfg.items())
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ConfigError(f"{_FIELD}: unknown fields {unknown}; accepted: {sorted(fields)}")
  return MaskSpec(grid=tuple(grid) if isinstance(grid, (list, tuple)) else grid, **given)


def make_mask_tf(spec: MaskSpec, seed: tf.Tensor) -> tf.Tensor:
  """Draws one mask with graph ops; returns tf.bool [h*w], row-major.

  Args:
    spec: what to draw.
    seed: int32/int64 [2] stateless seed, e.g. tf.stack([run_seed, example_index]).
  """
  seed = tf.convert_to_tensor(seed)
  block_seed, fill_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if spec.kind == "random":
    u = tf.random.stateless_uniform([spec.num_patches], seed=fill_seed)
    return _rank_descending(u) < spec.num_masking_patches
  mask = tf.reshape(_blockwise_tf(spec, block_seed), [-1])
  if spec.exact:
    mask = _fix_count_tf(mask, spec.num_masking_patches, fill_seed)
  return mask


def _rank_descending(x: tf.Tensor) -> tf.Tensor:
  """Position of each element of x [N] in descending order (a permutation of 0..N-1)."""
  return tf.argsort(tf.argsort(x, direction="DESCENDING", stable=True), stable=True)


def _blockwise_tf(spec: MaskSpec, seed: tf.Tensor) -> tf.Tensor:
  """unilm's MaskingGenerator.__call__ as a tf.while_loop; returns bool [h, w].

  unilm tries up to 10 blocks one after another and keeps the first acceptable one. The mask
  does not change between tries, so all 10 are drawn and tested at once and one accepted try
  is kept (which one depends only on which were accepted, so the pick is unbiased): the same
  distribution in one loop step instead of ten. On tensors this small the cost is per op, so
  rows and columns share ops: a block is a pair of 0/1 indicators over a square n x n grid
  (n = max(h, w); accepted blocks never reach the padding) and overlaps are counted by matmuls.
  """
  h, w = spec.grid
  n = max(h, w)
  target = float(spec.num_masking_patches)
  lo_log_aspect, hi_log_aspect = spec.log_aspect_range
  min_area = float(spec.min_num_patches)
  # Every step masks >= 1 patch or ends the loop, so `target` steps always suffice; all their
  # random numbers are drawn at once. Axes [step, quantity, 1, attempt].
  u = tf.random.stateless_uniform([spec.num_masking_patches, 4, 1, _ATTEMPTS], seed=seed)
  area_u, aspect_u, top_u, left_u = tf.unstack(u, axis=1)
  sqrt_aspect = tf.exp(0.5 * (lo_log_aspect + (hi_log_aspect - lo_log_aspect) * aspect_u))
  # random.uniform(a, b) = a + (b - a) * U = a * (1 - U) + b * U, also when b < a.
  table = tf.stack(  # [K, 6, 1, A]
    [area_u, min_area * (1.0 - area_u), sqrt_aspect, 1.0 / sqrt_aspect, top_u, left_u], axis=1
  )
  dims = tf.constant([h, w], tf.float32)[:, None, None]  # [2, 1, 1]
  coords = tf.range(n, dtype=tf.float32)[:, None]  # [n, 1]
  ones = tf.ones([1, n])

  def body(step, mask, count, go):  # mask: float32 [n, n], 1 = masked
    del go
    area_u, area_base, side_factors, pos_u = tf.split(tf.gather(table, step), [1, 1, 2, 2])
    max_new = tf.minimum(target - count, spec.block_cap)
    sizes = tf.round(tf.sqrt(area_base + max_new * area_u) * side_factors)  # [2, 1, A]
    # randint(0, m) includes m: floor(U * (m + 1)).
    starts = tf.floor(pos_u * (dims + 1 - sizes))
    in_rows, in_cols = tf.unstack(  # each [n, A]
      tf.cast((coords >= starts) & (coords < starts + sizes), tf.float32)
    )
    covered = tf.matmul(ones, in_rows * tf.matmul(mask, in_cols))  # [1, A] already masked
    rows, cols = tf.unstack(sizes)  # each [1, A]
    new = rows * cols - covered
    ok = (rows < h) & (cols < w) & (new > 0) & (new <= max_new)  # [1, A]
    accepted = tf.reduce_any(ok)
    pick = tf.argmax(tf.cast(ok, tf.int32), axis=1, output_type=tf.int32)  # [1]
    block = tf.matmul(
      tf.gather(in_rows, pick, axis=1), tf.gather(in_cols, pick, axis=1), transpose_b=True
    )  # [n, n]
    mask = tf.where(accepted, tf.maximum(mask, block), mask)
    count = tf.reduce_sum(mask)
    return step + 1, mask, count, accepted & (count < target)

  _, mask, _, _ = tf.while_loop(
    lambda step, mask, count, go: go,
    body,
    (tf.constant(0, tf.int32), tf.zeros([n, n]), tf.constant(0.0), tf.constant(True)),
  )
  return mask[:h, :w] > 0


def _fix_count_tf(mask: tf.Tensor, target: int, seed: tf.Tensor) -> tf.Tensor:
  """BEiT v2: flips random unmasked (too few) or masked (too many) patches; bool [N] in/out."""
  count = tf.reduce_sum(tf.cast(mask, tf.int32))
  candidates = tf.equal(mask, count > target)  # the cells whose flip moves count to target
  scores = tf.where(candidates, tf.random.stateless_uniform(mask.shape, seed=seed), -1.0)
  return mask ^ (_rank_descending(scores) < tf.abs(count - target))


def make_mask_np(spec: MaskSpec, rng: np.random.Generator) -> np.ndarray:
  """The same masks as `make_mask_tf` (in distribution) from NumPy; bool [h*w], row-major."""
  if spec.kind == "random":
    mask = np.zeros(spec.num_patches, bool)
    mask[rng.choice(spec.num_patches, spec.num_masking_patches, replace=False)] = True
    return mask
  mask = np.zeros(spec.grid, np.int32)
  count = 0
  while count < spec.num_masking_patches:
    delta = _add_block_np(spec, mask, min(spec.num_masking_patches - count, spec.block_cap), rng)
    if delta == 0:
      break
    count += delta
  mask = mask.reshape(-1).astype(bool)
  if spec.exact:
    mask = _fix_count_np(mask, spec.num_masking_patches, rng)
  return mask


def _add_block_np(spec: MaskSpec, mask: np.ndarray, max_new: int, rng: np.random.Generator) -> int:
  """unilm's MaskingGenerator._mask: masks one block in place, returns the patches it added."""
  h, w = spec.grid
  lo_log_aspect, hi_log_aspect = spec.log_aspect_range
  for _ in range(_ATTEMPTS):
    area = spec.min_num_patches + (max_new - spec.min_num_patches) * rng.random()
    aspect = math.exp(lo_log_aspect + (hi_log_aspect - lo_log_aspect) * rng.random())
    hb = round(math.sqrt(area * aspect))
    wb = round(math.sqrt(area / aspect))
    if hb < h and wb < w:
      top = rng.integers(0, h - hb, endpoint=True)
      left = rng.integers(0, w - wb, endpoint=True)
      block = mask[top : top + hb, left : left + wb]
      new = hb * wb - block.sum()
      if 0 < new <= max_new:
        block[...] = 1
        return int(new)
  return 0


def _fix_count_np(mask: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
  """BEiT v2: flips random unmasked (too few) or masked (too many) patches; bool [N] in/out."""
  count = int(mask.sum())
  candidates = np.flatnonzero(mask == (count > target))
  mask = mask.copy()
  mask[rng.choice(candidates, abs(count - target), replace=False)] ^= True
  return mask
