"""The one optimizer builder of every trainer (`make_optimizer`): its learning-rate schedules
(cosine; mmcv's poly for segmentation), AdamW with BEiT's weight-decay rules
(docs/reference.md §4), per-parameter lr scales (layer decay, §5) and frozen parameters."""

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from beit_jax.params import blocks
from beit_jax.training import validate
from beit_jax.errors import ConfigError
from beit_jax.models.paths import path_str

# Parameters that never get weight decay besides those with ndim <= 1 (biases, norms,
# LayerScale). unilm decays the mask token and the relative position table.
NO_DECAY_NAMES = ("pos_embed", "cls_token")
# Layer 0 of the layer-wise lr decay (unilm's get_layer_id_for_vit).
_EMBEDDINGS = ("cls_token", "mask_token", "pos_embed", "patch_embed")


# The schedule kinds `make_optimizer` builds.
SCHEDULES = ("cosine", "poly")
# mmcv's linear warmup starts at this fraction of the scheduled lr (unilm's segmentation).
WARMUP_RATIO = 1e-6

_n = validate.number
# The fields of an optimizer group (`config.optim`).
_FIELDS = (
  ("lr", _n(0, lo_open=True), "a number > 0"),
  ("min_lr", _n(0), "a number >= 0"),
  ("warmup_epochs", _n(0), "a number >= 0"),
  ("warmup_steps", _n(0, integer=True), "an integer >= 0"),
  ("b1", _n(0, 1, hi_open=True), "a number in [0, 1)"),
  ("b2", _n(0, 1, hi_open=True), "a number in [0, 1)"),
  ("eps", _n(0), "a number >= 0"),
  ("weight_decay", _n(0), "a number >= 0"),
  ("grad_clip", _n(0), "a number >= 0 (0: off)"),
  (
    "accum_steps",
    _n(1, integer=True),
    "an integer >= 1 (micro-batches per step, summed before one update; 1: none)",
  ),
)


def rules(group: str) -> tuple[validate.Rule, ...]:
  """The field rules of the optimizer group at `group` (e.g. 'optim')."""
  return tuple((f"{group}.{name}", test, accepted) for name, test, accepted in _FIELDS)


def accumulation_check(group: str, batch_field: str) -> validate.Check:
  """`<group>.accum_steps` must divide the global batch `batch_field` (one ConfigError line);
  that each device's share splits too is checked with the mesh (`sharding.check_batch_size`)."""

  def check(config: ml_collections.ConfigDict) -> None:
    k, batch = validate.get(config, f"{group}.accum_steps"), validate.get(config, batch_field)
    if isinstance(k, int) and isinstance(batch, int) and k >= 1 and batch % k:
      raise ConfigError(
        f"{batch_field}={batch} must be divisible by {group}.accum_steps={k} "
        "(the batch is split into that many micro-batches)"
      )

  return check


def accum_steps(config: ml_collections.ConfigDict) -> int:
  """Micro-batches per step (`optim.accum_steps`; 1 where a config predates the field)."""
  return config.get("optim", {}).get("accum_steps", 1)


RULES = rules("optim") + (
  ("optim.layer_decay", _n(0, 1, lo_open=True), "a number in (0, 1] (1: no decay)"),
  ("optim.power", _n(0, lo_open=True), "a number > 0 (1: linear decay)"),
)
CHECKS = (accumulation_check("optim", "input.batch_size"),)


def lr_schedule(
  base_lr: float, *, total_steps: int, warmup_steps: int, min_lr: float = 0.0
) -> optax.Schedule:
  """Linear warmup from 0 to `base_lr`, then cosine to `min_lr` at `total_steps`."""
  if total_steps <= 0:
    raise ConfigError(f"total_steps must be > 0, got {total_steps}")
  warmup_steps = min(warmup_steps, total_steps)
  if warmup_steps == total_steps:
    return optax.linear_schedule(0.0, base_lr, max(warmup_steps, 1))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=base_lr,
    warmup_steps=warmup_steps,
    decay_steps=total_steps,
    end_value=min_lr,
  )


def poly_schedule(
  lr: float, *, total_steps: int, warmup_steps: int, power: float, min_lr: float = 0.0
) -> optax.Schedule:
  """mmcv's `poly` policy with linear warmup, per step:

  lr_t = ((lr - min_lr) * (1 - t / total_steps) ** power + min_lr) * w_t with
  w_t = 1 - (1 - t / warmup_steps) * (1 - WARMUP_RATIO) during the warmup, then 1.
  """

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    poly = (lr - min_lr) * (1.0 - jnp.minimum(t, total_steps) / total_steps) ** power + min_lr
    if warmup_steps <= 0:
      return poly
    warm = WARMUP_RATIO + (1.0 - WARMUP_RATIO) * t / warmup_steps  # w_t, exact in float32
    return poly * jnp.where(t < warmup_steps, warm, 1.0)

  return schedule


def make_schedule(
  kind: str, optim: ml_collections.ConfigDict, *, total_steps: int, warmup_steps: int
) -> optax.Schedule:
  """The `kind` schedule of `optim`'s lr and min_lr: 'cosine' (`lr_schedule`) or 'poly'
  (`poly_schedule` with power `optim.power`)."""
  if kind == "cosine":
    return lr_schedule(
      optim.lr, total_steps=total_steps, warmup_steps=warmup_steps, min_lr=optim.min_lr
    )
  if kind == "poly":
    return poly_schedule(
      optim.lr,
      total_steps=total_steps,
      warmup_steps=warmup_steps,
      power=optim.power,
      min_lr=optim.min_lr,
    )
  raise ValueError(f"schedule={kind!r}: one of {SCHEDULES}")


def weight_decay_mask(params: Any, no_decay_names=NO_DECAY_NAMES) -> Any:
  """True where AdamW applies weight decay."""

  def decays(path, leaf):
    name = path_str(path)
    if leaf.ndim <= 1:
      return False
    return not any(re.search(rf"(^|/){n}($|/)", name) for n in no_decay_names)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
  optim: ml_collections.ConfigDict,
  *,
  total_steps: int,
  warmup_steps: int,
  schedule: str = "cosine",
  lr_scale_fn: Callable[[Any], Any] | None = None,
  frozen: Sequence[str] = (),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW for an optimizer group (`config.optim`, a tokenizer's `train.optim`): every
  trainer's optimizer.

  In order: global-norm clipping (`grad_clip` > 0), Adam, decoupled weight decay where
  `weight_decay_mask`, the per-parameter lr scales, the schedule.

  Args:
    optim: fields lr, min_lr, b1, b2, eps, weight_decay, grad_clip (<= 0: off); power for
      the 'poly' schedule.
    total_steps: length of the schedule.
    warmup_steps: linear warmup steps.
    schedule: its kind, one of SCHEDULES.
    lr_scale_fn: params -> per-leaf lr multipliers (layer-wise decay), or None.
    frozen: top-level keys of the params that get no update at all: no moments, no weight
      decay (VQ-KD's codebook, which its trainer moves by EMA).
  Returns:
    (transformation, schedule) -- the schedule is returned for logging.
  """
  if optim.lr <= 0:
    raise ConfigError(f"optim.lr must be > 0, got {optim.lr}")
  if not 0 <= optim.b1 < 1 or not 0 <= optim.b2 < 1:
    raise ConfigError(f"optim.b1/optim.b2 must be in [0, 1), got {optim.b1}, {optim.b2}")
  lr = make_schedule(schedule, optim, total_steps=total_steps, warmup_steps=warmup_steps)
  tx = _adamw(optim, lr, lr_scale_fn)
  if frozen:
    frozen = tuple(frozen)
    if "train" in frozen:
      raise ValueError("frozen: 'train' names the trained parameters' transformation")
    labels = lambda tree: {
      k: jax.tree.map(lambda _, k=k: k if k in frozen else "train", v) for k, v in tree.items()
    }
    tx = optax.multi_transform({"train": tx, **{k: optax.set_to_zero() for k in frozen}}, labels)
  return tx, lr


def _adamw(
  optim: ml_collections.ConfigDict,
  schedule: optax.Schedule,
  lr_scale_fn: Callable[[Any], Any] | None,
) -> optax.GradientTransformation:
  parts = []
  if optim.grad_clip and optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps))
  if optim.weight_decay > 0:
    parts.append(optax.add_decayed_weights(optim.weight_decay, mask=weight_decay_mask))
  if lr_scale_fn is not None:
    parts.append(_scale_by_tree(lr_scale_fn))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)


def _scale_by_tree(scale_fn) -> optax.GradientTransformation:
  """Multiplies updates by a per-leaf constant tree computed from the params."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    scales = scale_fn(updates if params is None else params)
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

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

  def scale(path, leaf, stacked):
    name = path_str(path)
    if stacked:
      per_layer = decay ** (depth - np.arange(depth, dtype=np.float64))  # layers 1..depth
      return per_layer.reshape((depth,) + (1,) * (leaf.ndim - 1))
    return decay ** (depth + 1 - layer_id(name, depth))

  return jax.tree_util.tree_map_with_path(scale, params, blocks.stacked_mask(params))
