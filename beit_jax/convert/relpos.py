"""Position information for another patch grid, i.e. image size (docs/reference.md §5).

Host-side numpy, run once on loaded weights: when converting a checkpoint, and when
fine-tuning at a resolution other than the pretraining one.
"""

import numpy as np
from scipy import interpolate

from beit_jax.errors import ConfigError

_NUM_EXTRA = 3  # cls-to-token, token-to-cls, cls-to-cls


def _source_positions(src_len: int, dst_len: int) -> np.ndarray:
  """Where the `src_len` samples of one offset axis sit on the target's integer axis.

  unilm's geometric progression: from the centre outwards the spacing grows by a
  factor q, found by bisection in [1.01, 1.5] so the outermost sample reaches the
  target's outermost offset t. Offsets near 0 (the most common ones) thus keep almost
  their value, far ones are stretched.
  """
  n, t = src_len // 2, dst_len // 2

  def reach(q):  # 1 + q + ... + q**(n-1)
    return (1.0 - q**n) / (1.0 - q)

  left, right = 1.01, 1.5
  while right - left > 1e-6:
    q = (left + right) / 2.0
    if reach(q) > t:
      right = q
    else:
      left = q
  dis = np.cumsum(q ** np.arange(n))  # 1, 1+q, 1+q+q^2, ...
  return np.concatenate([-dis[::-1], [0.0], dis])


def _resize_offset_axis(x: np.ndarray, axis: int, dst_len: int) -> np.ndarray:
  """One axis of the (2h-1, 2w-1, H) offset grid to `dst_len` samples.

  Shrinking keeps the central offsets as they are (a smaller image has only those);
  growing evaluates a cubic interpolating spline (not-a-knot, i.e. FITPACK's s=0
  spline behind unilm's `interp2d(kind='cubic')`) through the geometric positions at
  the integer offsets, clamped to the samples' range as FITPACK does (the bisection
  can stop a hair short of t; a tiny grid may not reach it at all). unilm's
  tensor-product spline factors into these 1-D splines along each axis.
  """
  src_len = x.shape[axis]
  if dst_len <= src_len:
    start = (src_len - dst_len) // 2
    return np.take(x, np.arange(start, start + dst_len), axis=axis)
  t = dst_len // 2
  positions = _source_positions(src_len, dst_len)
  spline = interpolate.make_interp_spline(positions, x, k=min(3, src_len - 1), axis=axis)
  return spline(np.clip(np.arange(-t, t + 1.0), positions[0], positions[-1]))


def resize_rel_pos_table(
  table: np.ndarray, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> np.ndarray:
  """A relative position bias table for another patch grid.

  Per head, the (2h-1) x (2w-1) offset part is resampled (unilm's geometric grid +
  cubic interpolation when growing, the central offsets when shrinking); the 3 extra
  rows ([CLS] pairs) are kept. Same grid -> the same table.

  Args:
    table: [(2h-1)*(2w-1) + 3, heads] for `src_grid` = (h, w).
    src_grid: (h, w) patch grid the table was trained on.
    dst_grid: (h', w') patch grid wanted.

  Returns:
    [(2h'-1)*(2w'-1) + 3, heads], the dtype of `table`.
  """
  table = np.asarray(table)
  (h, w), (dh, dw) = src_grid, dst_grid
  if min(h, w, dh, dw) < 1:
    raise ConfigError(f"patch grids must be positive, got {src_grid} -> {dst_grid}")
  num = (2 * h - 1) * (2 * w - 1)
  if table.ndim != 2 or table.shape[0] != num + _NUM_EXTRA:
    raise ConfigError(
      f"relative position bias table of shape {table.shape} does not fit "
      f"a {h}x{w} patch grid: expected [{num + _NUM_EXTRA}, heads]"
    )
  offsets = table[:num].astype(np.float64).reshape(2 * h - 1, 2 * w - 1, -1)
  offsets = _resize_offset_axis(offsets, 0, 2 * dh - 1)
  offsets = _resize_offset_axis(offsets, 1, 2 * dw - 1)
  out = np.concatenate([offsets.reshape(-1, table.shape[1]), table[num:]], axis=0)
  return out.astype(table.dtype)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 (torch's a)."""

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(src_len: int, dst_len: int) -> np.ndarray:
  """[dst_len, src_len] matrix of torch `interpolate(mode='bicubic', align_corners=False)`.

  Half-pixel centres, a = -0.75, taps clamped at the borders, no antialiasing: the
  resize unilm and HF apply to absolute position embeddings.
  """
  src = (np.arange(dst_len) + 0.5) * (src_len / dst_len) - 0.5
  base = np.floor(src)
  weights = _cubic_weights(src - base)  # [dst, 4]
  taps = np.clip(base[:, None].astype(int) + np.arange(-1, 3), 0, src_len - 1)
  matrix = np.zeros((dst_len, src_len))
  np.add.at(matrix, (np.repeat(np.arange(dst_len), 4), taps.ravel()), weights.ravel())
  return matrix


def resize_abs_pos_embed(
  pos_embed: np.ndarray, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> np.ndarray:
  """[1, 1+h*w, D] absolute position embedding -> [1, 1+h'*w', D]; [CLS] row kept.

  The patch rows are resized bicubically on the patch grid, as unilm's fine-tuning
  script does.
  """
  pos_embed = np.asarray(pos_embed)
  (h, w), (dh, dw) = src_grid, dst_grid
  if pos_embed.ndim != 3 or pos_embed.shape[:2] != (1, 1 + h * w):
    raise ConfigError(
      f"position embedding of shape {pos_embed.shape} does not fit a "
      f"{h}x{w} patch grid: expected [1, {1 + h * w}, width]"
    )
  patches = pos_embed[0, 1:].astype(np.float64).reshape(h, w, -1)
  patches = np.einsum("Hh,Ww,hwd->HWd", bicubic_matrix(h, dh), bicubic_matrix(w, dw), patches)
  out = np.concatenate([pos_embed[0, :1], patches.reshape(dh * dw, -1)], axis=0)
  return out[None].astype(pos_embed.dtype)
