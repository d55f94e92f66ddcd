"""Blockwise/random masking: TF graph ops against the NumPy reference and docs/reference.md §2."""

import functools

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from beit_jax.data import masking
from beit_jax.errors import ConfigError

N = 2000  # masks per statistic
DEFAULT = masking.MaskSpec()


@functools.cache
def tf_masks(spec: masking.MaskSpec, n: int = N, seed: int = 0) -> np.ndarray:
  """Masks from make_mask_tf run the way the input pipeline runs it; bool [n, h, w]."""
  ds = tf.data.Dataset.range(n).map(
    lambda i: masking.make_mask_tf(spec, tf.stack([tf.constant(seed, tf.int64), i])),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  masks = np.concatenate(list(ds.batch(500).as_numpy_iterator()))
  assert masks.shape == (n, spec.num_patches) and masks.dtype == bool
  return masks.reshape(n, *spec.grid)


@functools.cache
def np_masks(spec: masking.MaskSpec, n: int = N, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  masks = np.stack([masking.make_mask_np(spec, rng) for _ in range(n)])
  assert masks.shape == (n, spec.num_patches) and masks.dtype == bool
  return masks.reshape(n, *spec.grid)


IMPLS = {"tf": tf_masks, "np": np_masks}


def mean_blocks(masks: np.ndarray) -> float:
  """Average number of 4-connected masked regions per mask."""
  return float(np.mean([ndimage.label(m)[1] for m in masks]))


def assert_same_distribution(a: np.ndarray, b: np.ndarray):
  counts_a, counts_b = a.sum((1, 2)), b.sum((1, 2))
  assert abs(counts_a.mean() - counts_b.mean()) < 0.15
  assert abs(mean_blocks(a) - mean_blocks(b)) < 0.08
  freq_diff = np.abs(a.mean(0) - b.mean(0))  # per-cell masking frequency
  assert freq_diff.max() < 0.08 and freq_diff.mean() < 0.02


@pytest.mark.parametrize("impl", IMPLS)
def test_blockwise_matches_spec_numbers(impl):
  masks = IMPLS[impl](DEFAULT)
  counts = masks.sum((1, 2))
  freq = masks.mean(0)
  # docs/reference.md §2 (4000 unilm masks): mean 74.4, min 64, max 75, 1.4 blocks, corners 3%,
  # centre 72%.
  assert counts.max() == 75 and counts.min() >= 55
  assert 74.2 < counts.mean() < 74.7
  assert 1.35 < mean_blocks(masks) < 1.5
  assert freq[[0, 0, -1, -1], [0, -1, 0, -1]].mean() < 0.06
  assert 0.65 < freq[6:8, 6:8].mean() < 0.78


@pytest.mark.parametrize(
  "spec",
  [
    DEFAULT,
    masking.MaskSpec(max_num_patches=30),  # smaller blocks, more of them
    masking.MaskSpec(grid=(12, 20), num_masking_patches=96),
    masking.MaskSpec(grid=(8, 8), num_masking_patches=26, min_num_patches=4),
    masking.MaskSpec(min_aspect=0.5, max_aspect=4.0),  # tall blocks
  ],
  ids=["default", "max_num_patches", "non_square", "small", "aspect"],
)
def test_tf_matches_numpy_reference(spec):
  tf_m, np_m = tf_masks(spec), np_masks(spec)
  assert tf_m.sum((1, 2)).max() <= spec.num_masking_patches
  assert np_m.sum((1, 2)).max() <= spec.num_masking_patches
  assert_same_distribution(tf_m, np_m)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("aspect,shape", [(2.0, (4, 2)), (0.5, (2, 4))])
def test_single_block_is_a_filled_rectangle_at_any_position(impl, aspect, shape):
  # area 8 at a fixed aspect: one block of round(sqrt(8*r)) rows x round(sqrt(8/r)) cols.
  spec = masking.MaskSpec(
    grid=(6, 9), num_masking_patches=8, min_num_patches=8, min_aspect=aspect, max_aspect=aspect
  )
  corners = set()
  for m in IMPLS[impl](spec, n=600):
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    assert (len(rows), len(cols)) == shape and m.sum() == 8
    corners.add((rows[0], cols[0]))
  # randint(0, h - hb) is inclusive: the block can touch every border.
  assert corners == {(r, c) for r in range(6 - shape[0] + 1) for c in range(9 - shape[1] + 1)}


@pytest.mark.parametrize("impl", IMPLS)
def test_block_as_tall_as_the_grid_never_fits(impl):
  # unilm accepts a block only if rows < h and cols < w: a 4 x 2 block never fits 4 rows.
  spec = masking.MaskSpec(
    grid=(4, 9), num_masking_patches=8, min_num_patches=8, min_aspect=2.0, max_aspect=2.0
  )
  assert not IMPLS[impl](spec, n=100).any()


def test_tf_same_seed_same_mask_different_seed_different_mask():
  seed = tf.constant([3, 5], tf.int32)
  first = masking.make_mask_tf(DEFAULT, seed).numpy()
  assert first.shape == (196,) and first.dtype == bool
  np.testing.assert_array_equal(first, masking.make_mask_tf(DEFAULT, seed).numpy())
  np.testing.assert_array_equal(tf_masks(DEFAULT, n=50), tf_masks.__wrapped__(DEFAULT, n=50))
  per_example = tf_masks(DEFAULT, n=50).reshape(50, -1)
  assert len({m.tobytes() for m in per_example}) == 50
  other_run = tf_masks(DEFAULT, n=50, seed=1).reshape(50, -1)
  assert not any((a == b).all() for a, b in zip(per_example, other_run))


def test_np_same_rng_seed_same_masks():
  np.testing.assert_array_equal(np_masks(DEFAULT, n=20), np_masks.__wrapped__(DEFAULT, n=20))
  assert not np.array_equal(np_masks(DEFAULT, n=20), np_masks(DEFAULT, n=20, seed=1))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
  "spec",
  [
    masking.MaskSpec(exact=True),
    masking.MaskSpec(grid=(8, 8), num_masking_patches=26, min_num_patches=4, exact=True),
  ],
  ids=["default", "small"],
)
def test_exact_always_hits_target(impl, spec):
  masks = IMPLS[impl](spec, n=500)
  np.testing.assert_array_equal(masks.sum((1, 2)), spec.num_masking_patches)
  assert mean_blocks(masks) < 3  # still mostly blocks, a few single patches added


@pytest.mark.parametrize("target", [6, 14])
def test_fix_count_only_flips_the_needed_side(target):
  mask = np.zeros(20, bool)
  mask[3:13] = True  # 10 masked
  fixed = [
    masking._fix_count_np(mask, target, np.random.default_rng(0)),
    masking._fix_count_tf(tf.constant(mask), target, tf.constant([0, 1])).numpy(),
  ]
  for out in fixed:
    assert out.sum() == target
    # removing keeps a subset of the masked cells, adding a superset
    assert (out <= mask).all() if target < 10 else (out >= mask).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_random_kind_is_exact_and_uniform(impl):
  spec = masking.MaskSpec(kind="random")
  masks = IMPLS[impl](spec)
  np.testing.assert_array_equal(masks.sum((1, 2)), 75)
  # binomial sd of a cell's frequency is 0.011 here
  assert np.abs(masks.mean(0) - 75 / 196).max() < 0.06
  assert mean_blocks(masks) > 15  # scattered, unlike the 1.4 blocks of blockwise masking


def test_tf_graph_has_no_python_ops():
  fn = tf.function(lambda s: masking.make_mask_tf(masking.MaskSpec(exact=True), s))
  graph_def = fn.get_concrete_function(tf.TensorSpec([2], tf.int64)).graph.as_graph_def()
  op_types = {n.op for n in graph_def.node}
  op_types |= {n.op for f in graph_def.library.function for n in f.node_def}
  assert "StatelessWhile" in op_types or "While" in op_types
  assert not op_types & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}
  assert not any(t.startswith("RandomUniform") or t == "RandomStandardNormal" for t in op_types)


def test_mask_spec_from_config():
  assert masking.mask_spec_from_config(ml_collections.ConfigDict(), (14, 14)) == DEFAULT
  cfg = ml_collections.ConfigDict(
    {"kind": "blockwise", "num_masking_patches": 26, "min_num_patches": 4, "exact": True}
  )
  spec = masking.mask_spec_from_config(cfg, (8, 8))
  assert spec == masking.MaskSpec(
    grid=(8, 8), num_masking_patches=26, min_num_patches=4, exact=True
  )
  with pytest.raises(ConfigError, match=r"input\.mask: unknown fields \['num_masked'\]"):
    masking.mask_spec_from_config(ml_collections.ConfigDict({"num_masked": 75}), (14, 14))


@pytest.mark.parametrize(
  "kwargs,pattern",
  [
    ({"kind": "grid"}, r"input\.mask\.kind must be one of \('blockwise', 'random'\)"),
    ({"num_masking_patches": 197}, r"input\.mask\.num_masking_patches .* \[1, 196\]"),
    ({"num_masking_patches": 0}, r"input\.mask\.num_masking_patches .* \[1, 196\]"),
    ({"num_masking_patches": 75.0}, r"input\.mask\.num_masking_patches must be an int"),
    ({"min_num_patches": 76}, r"input\.mask\.min_num_patches .* \[1, 75\]"),
    ({"max_num_patches": 10}, r"input\.mask\.max_num_patches .* \[16, 75\]"),
    ({"min_aspect": 0.0}, r"input\.mask\.min_aspect must be a number > 0"),
    ({"max_aspect": 0.2}, r"input\.mask\.max_aspect .* >= min_aspect=0\.3"),
    ({"exact": "yes"}, r"input\.mask\.exact must be True or False"),
    ({"grid": (1, 14)}, r"input\.mask grid .*\(>= 2 for blockwise masking\)"),
  ],
)
def test_invalid_spec_raises_config_error(kwargs, pattern):
  with pytest.raises(ConfigError, match=pattern):
    masking.MaskSpec(**kwargs)
