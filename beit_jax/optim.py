"""Learning-rate schedules and AdamW with BEiT's weight-decay rules (SPEC §4)."""
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from beit_jax.errors import ConfigError
from beit_jax.param_paths import path_str

# Parameters that never get weight decay besides those with ndim <= 1 (biases, norms,
# LayerScale). unilm decays the mask token and the relative position table.
NO_DECAY_NAMES = ("pos_embed", "cls_token")


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
