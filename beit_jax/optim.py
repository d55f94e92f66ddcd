"""Learning-rate schedules, AdamW with BEiT's weight-decay rules (docs/reference.md §4), layer
decay (§5)."""
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from beit_jax import block_layout
from beit_jax import validate
from beit_jax.errors import ConfigError
from beit_jax.param_paths import path_str

# Parameters that never get weight decay besides those with ndim <= 1 (biases, norms,
# LayerScale). unilm decays the mask token and the relative position table.
NO_DECAY_NAMES = ("pos_embed", "cls_token")
# Layer 0 of the layer-wise lr decay (unilm's get_layer_id_for_vit).
_EMBEDDINGS = ("cls_token", "mask_token", "pos_embed", "patch_embed")


_n = validate.number
RULES = (
    ("optim.lr", _n(0, lo_open=True), "a number > 0"),
    ("optim.min_lr", _n(0), "a number >= 0"),
    ("optim.warmup_epochs", _n(0), "a number >= 0"),
    ("optim.warmup_steps", _n(0, integer=True), "an integer >= 0"),
    ("optim.b1", _n(0, 1, hi_open=True), "a number in [0, 1)"),
    ("optim.b2", _n(0, 1, hi_open=True), "a number in [0, 1)"),
    ("optim.eps", _n(0), "a number >= 0"),
    ("optim.weight_decay", _n(0), "a number >= 0"),
    ("optim.grad_clip", _n(0), "a number >= 0 (0: off)"),
    ("optim.layer_decay", _n(0, 1, lo_open=True), "a number in (0, 1] (1: no decay)"),
)


def lr_schedule(base_lr: float, *, total_steps: int, warmup_steps: int,
                min_lr: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to `base_lr`, then cosine to `min_lr` at `total_steps`."""
  if total_steps <= 0:
    raise ConfigError(f"total_steps must be > 0, got {total_steps}")
  warmup_steps = min(warmup_steps, total_steps)
  if warmup_steps == total_steps:
    return optax.linear_schedule(0.0, base_lr, max(warmup_steps, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=base_lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=min_lr)


def weight_decay_mask(params: Any,
                      no_decay_names=NO_DECAY_NAMES) -> Any:
  """True where AdamW applies weight decay."""
  def decays(path, leaf):
    name = path_str(path)
    if leaf.ndim <= 1:
      return False
    return not any(re.search(rf"(^|/){n}($|/)", name) for n in no_decay_names)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: ml_collections.ConfigDict, *, total_steps: int,
                   warmup_steps: int,
                   lr_scale_fn: Callable[[Any], Any] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (+ global-norm clipping) for `config.optim`.

  Args:
    optim: fields lr, min_lr, b1, b2, eps, weight_decay, grad_clip (<= 0: off).
    total_steps: length of the cosine schedule.
    warmup_steps: linear warmup steps.
    lr_scale_fn: params -> per-leaf lr multipliers (layer-wise decay), or None.
  Returns:
    (transformation, schedule) -- the schedule is returned for logging.
  """
  if optim.lr <= 0:
    raise ConfigError(f"optim.lr must be > 0, got {optim.lr}")
  if not 0 <= optim.b1 < 1 or not 0 <= optim.b2 < 1:
    raise ConfigError(f"optim.b1/optim.b2 must be in [0, 1), got {optim.b1}, {optim.b2}")
  schedule = lr_schedule(optim.lr, total_steps=total_steps,
                         warmup_steps=warmup_steps, min_lr=optim.min_lr)
  parts = []
  if optim.grad_clip and optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps))
  if optim.weight_decay > 0:
    parts.append(optax.add_decayed_weights(optim.weight_decay,
                                           mask=weight_decay_mask))
  if lr_scale_fn is not None:
    parts.append(_scale_by_tree(lr_scale_fn))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule


def _scale_by_tree(scale_fn) -> optax.GradientTransformation:
  """Multiplies updates by a per-leaf constant tree computed from the params."""
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    scales = scale_fn(updates if params is None else params)
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates,
                        scales), state
  return optax.GradientTransformation(init_fn, update_fn)


def layer_id(path: str, depth: int) -> int:
  """unilm's layer of a parameter: 0 embeddings, b+1 block b, depth+1 everything after."""
  top = path.split("/")[0]
  if top in _EMBEDDINGS:
    return 0
  m = re.fullmatch(r"blocks_(\d+)", top)
  if m:
    return int(m.group(1)) + 1
  return depth + 1  # rel_pos_bias, norm, fc_norm, head


def layer_decay_scales(params: Any, *, depth: int, decay: float) -> Any:
  """Per-parameter lr multipliers decay^(depth + 1 - layer): 1 for the head.

  A scanned block leaf ([depth, ...] under `blocks`) gets one multiplier per layer,
  shaped [depth, 1, ...] to broadcast.
  """
  def scale(path, leaf):
    name = path_str(path)
    if block_layout.STACKED_PATH.search(name):
      per_layer = decay ** (depth - np.arange(depth, dtype=np.float64))  # layers 1..depth
      return per_layer.reshape((depth,) + (1,) * (leaf.ndim - 1))
    return decay ** (depth + 1 - layer_id(name, depth))
  return jax.tree_util.tree_map_with_path(scale, params)
