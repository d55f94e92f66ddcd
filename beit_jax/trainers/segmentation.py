"""Semantic segmentation with UperNet on BEiT, unilm's recipe (`beit/semantic_segmentation`).

Starts from any beit-jax ViT checkpoint (`config.init_from`) as fine-tuning does: a shared
relative position bias is copied into every block and the tables are resized to the crop's
patch grid (512 / 16 = 32); the pyramid and the heads start from scratch. AdamW with
layer-wise lr decay and mmseg's poly schedule (`optim.poly_schedule`, power `optim.power`)
after a linear warmup; the loss is the decode head's pixel cross-entropy plus
`upernet.aux_weight` times the auxiliary head's, both ignoring label 255. Validation (whole
images, sliding windows) every `eval_every_steps` and at the end; `checkpoints/` keeps the
latest states, `best/` the params of the best mIoU.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from beit_jax.training import optim
from beit_jax import params as params_lib
from beit_jax.training import runner
from beit_jax.training import model_rules
from beit_jax.training import sharding
from beit_jax.training import checkpoint
from beit_jax.evaluation import segmentation
from beit_jax.training import train_state
from beit_jax.training import validate
from beit_jax.data import segmentation as data
from beit_jax.errors import ConfigError
from beit_jax.models import segmentation as seg_model
from beit_jax.models import vit
from beit_jax.training.train_state import TrainState


def _index_tuple(n: int):
  return lambda v: (
    isinstance(v, (tuple, list))
    and len(v) == n
    and all(validate.number(0, integer=True)(x) for x in v)
  )


# The library modules whose config groups this trainer reads (`runner.Trainer.READS`):
# their RULES and CHECKS run before its own.
READS = (runner, optim, checkpoint, sharding, model_rules, data, segmentation)
RULES = (
  (
    "upernet.out_indices",
    _index_tuple(len(seg_model.LEVEL_STRIDES)),
    "4 block indices (0-based), e.g. (3, 5, 7, 11)",
  ),
  ("upernet.channels", *validate.POSITIVE_INT),
  ("upernet.aux_channels", *validate.POSITIVE_INT),
  (
    "upernet.pool_scales",
    lambda v: (
      isinstance(v, (tuple, list))
      and len(v) > 0
      and all(validate.number(1, integer=True)(x) for x in v)
    ),
    "a non-empty tuple of ints >= 1",
  ),
  ("upernet.dropout", validate.number(0, 1, hi_open=True), "a number in [0, 1)"),
  ("upernet.aux_weight", validate.number(0), "a number >= 0 (0: no auxiliary loss)"),
  ("upernet.norm_groups", *validate.POSITIVE_INT),
)


def _check(config: ml_collections.ConfigDict) -> None:
  m, up = config.model, config.upernet
  if m.use_shared_rel_pos_bias and m.use_rel_pos_bias:
    raise ConfigError(
      "model.use_shared_rel_pos_bias and model.use_rel_pos_bias are both True; "
      "segmentation uses one table per block (use_rel_pos_bias)"
    )
  if not config.get("total_steps"):
    raise ConfigError(
      "total_steps=0: segmentation runs are counted in steps (unilm: 160000); set total_steps"
    )
  sizes = vit.size_kwargs(m)
  if sizes["patch_size"] not in seg_model.PATCH_SIZES:
    raise ConfigError(
      f"model.variant={m.variant!r}: segmentation needs a patch size of 4, "
      f"8, 16 or 32 (the pyramid's strides 4..32 are powers of 2 of it), "
      f"not {sizes['patch_size']}"
    )
  if any(i >= sizes["depth"] for i in up.out_indices):
    raise ConfigError(
      f"upernet.out_indices={tuple(up.out_indices)} must be blocks "
      f"0..{sizes['depth'] - 1} of the model"
    )
  grouped = {"upernet.channels": up.channels, "upernet.aux_channels": up.aux_channels}
  if sizes["patch_size"] >= 16:  # fpn1 normalises the ViT's width
    grouped["model.width"] = sizes["width"]
  for field, n in grouped.items():
    if n % up.norm_groups:
      raise ConfigError(
        f"{field}={n} must be divisible by upernet.norm_groups={up.norm_groups} (GroupNorm)"
      )


CHECKS = (_check,)
prerequisites = runner.no_prerequisites


def preflight(config: ml_collections.ConfigDict, workdir: str) -> None:
  """What needs the outside world, checked before any compute."""
  runner.preflight(config, workdir)
  data.check(config)


def make_model(config: ml_collections.ConfigDict) -> seg_model.Segmenter:
  """The UperNet-on-BEiT model a config describes (drop path active only when called with
  train=True)."""
  up = config.upernet
  backbone = vit.from_config(
    config.model, image_size=config.input.image_size, train=True, truncate_init=False
  )
  return seg_model.Segmenter(
    backbone,
    out_indices=tuple(up.out_indices),
    num_classes=config.input.num_classes,
    channels=up.channels,
    aux_channels=up.aux_channels,
    pool_scales=tuple(up.pool_scales),
    dropout=up.dropout,
    norm_groups=up.norm_groups,
    dtype=jnp.dtype(config.model.get("dtype", "float32")),
  )


# --------------------------------------------------------------------------- optimizer


def layer_decay_scales(params: Any, *, depth: int, decay: float) -> Any:
  """Per-parameter lr multipliers: `optim.layer_decay_scales` within the backbone; 1 for the
  pyramid and the heads (unilm: the last layer, as a classifier's head)."""
  return {
    k: optim.layer_decay_scales(v, depth=depth, decay=decay)
    if k == "backbone"
    else jax.tree.map(lambda _: 1.0, v)
    for k, v in params.items()
  }


# --------------------------------------------------------------------------- steps


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  frozen: dict[str, Any],
  *,
  model: seg_model.Segmenter,
  tx,
  schedule,
  aux_weight: float,
  accum_steps: int = 1,
) -> tuple[TrainState, dict]:
  """One step: decode + aux_weight * auxiliary pixel cross-entropy, AdamW update.

  With `accum_steps` > 1 (`train_state.value_and_grad`) each micro-batch's losses and pixel
  accuracy are weighted by its labelled pixels: the whole batch's means over them.
  """
  del frozen

  def loss_fn(params, micro, rng):
    out = model.apply({"params": params}, micro["image"], train=True, rngs={"dropout": rng})
    decode, accuracy = segmentation.pixel_cross_entropy(out["logits"], micro["label"])
    aux, _ = segmentation.pixel_cross_entropy(out["aux_logits"], micro["label"])
    return decode + aux_weight * aux, (
      {"loss_decode": decode, "loss_aux": aux, "train_pixel_accuracy": accuracy},
      {},
    )

  (loss, (losses, _)), grads = train_state.value_and_grad(
    loss_fn,
    state.params,
    {"image": batch["image"], "label": batch["label"]},
    rng,
    accum_steps,
    weight=lambda micro: _labelled_pixels(micro["label"], model.num_classes),
  )
  new_state, metrics = train_state.apply_gradients(state, grads, loss, tx)
  metrics.update(
    loss=loss,
    learning_rate=schedule(state.step),
    param_norm=optax.global_norm(new_state.params),
    **losses,
  )
  return new_state, metrics


def _labelled_pixels(labels: jax.Array, num_classes: int) -> jax.Array:
  """The pixels `segmentation.pixel_cross_entropy` averages over: those labelled a class."""
  return jnp.sum((labels != segmentation.IGNORE) & (labels < num_classes))


def predict(params: Any, windows: jax.Array, *, model: seg_model.Segmenter) -> jax.Array:
  """Decode-head logits [n, S, S, C] of windows [n, S, S, 3] (mmseg's encode_decode)."""
  return model.apply({"params": params}, windows, train=False)["logits"]


def load_backbone(params: Any, config: ml_collections.ConfigDict) -> Any:
  """`init_from`'s ViT weights in the backbone (the final norm, unused here, may be missing:
  fine-tuned checkpoints have none); the pyramid and the heads keep their init."""
  backbone = params_lib.load_into(
    params["backbone"],
    config.init_from,
    vit=params_lib.ViTFit.of(config),
    drop=params_lib.OTHER_USES,
    fresh=params_lib.CLASSIFIER + ("norm",),
  )
  return {**params, "backbone": backbone}


def make_task(
  config: ml_collections.ConfigDict,
  workdir: str | None = None,
  *,
  frozen: runner.FrozenModels | None = None,
) -> runner.Task:
  """The segmentation run of `config` (`runner.Trainer`): no frozen model, nothing read
  from `workdir`."""
  del workdir
  runner.given_frozen(frozen, "Segmentation")
  model = make_model(config)
  depth = vit.size_kwargs(config.model)["depth"]
  total_steps = config.total_steps
  tx, schedule = optim.make_optimizer(
    config.optim,
    total_steps=total_steps,
    warmup_steps=config.optim.warmup_steps,
    schedule="poly",
    lr_scale_fn=functools.partial(layer_decay_scales, depth=depth, decay=config.optim.layer_decay),
  )
  size = config.input.image_size
  logging.info(
    "Segmentation %s: %s, %d classes, crops of %d, %d steps (warmup %d), layer decay %s, blocks %s",
    config.model.variant,
    config.input.dataset,
    config.input.num_classes,
    size,
    total_steps,
    config.optim.warmup_steps,
    config.optim.layer_decay,
    tuple(config.upernet.out_indices),
  )
  if not config.get("init_from"):
    logging.warning("No init_from: segmentation from a randomly initialised backbone")

  def init_params(rng):
    return model.init({"params": rng}, jnp.zeros((1, size, size, 3), jnp.float32))["params"]

  return runner.Task(
    desc="Segmentation",
    init_params=init_params,
    tx=tx,
    param_axes=seg_model.PARAM_AXES,
    train_step=functools.partial(
      train_step,
      model=model,
      tx=tx,
      schedule=schedule,
      aux_weight=config.upernet.aux_weight,
      accum_steps=optim.accum_steps(config),
    ),
    total_steps=total_steps,
    batch_size=config.input.batch_size,
    batches=lambda start: data.make_train_iterator(
      config,
      seed=config.seed,
      start_step=start,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    ),
    load_params=(
      functools.partial(load_backbone, config=config) if config.get("init_from") else None
    ),
    hooks=lambda ctx: (
      segmentation.evaluation_hook(
        ctx, config, "Segmentation", functools.partial(predict, model=model)
      ),
    ),
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) segmentation in `workdir`; returns the last and best metrics."""
  return runner.run(config, workdir, make_task(config, workdir))
