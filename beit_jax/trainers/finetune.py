"""Image classification fine-tuning with BEiT's recipe (unilm `beit/run_class_finetuning.py`).

Starts from any beit-jax ViT checkpoint (`config.init_from`: a pretraining run, or weights
imported by `beit_jax.convert`): the MIM head and final norm are dropped, a shared relative
position bias is copied into every block, position parameters are resized when fine-tuning
at another resolution, and `fc_norm` + `head` (x0.001 at init) classify the mean of the patch
outputs. AdamW with layer-wise lr decay, drop path, Mixup/CutMix with label smoothing on
device, RandAugment and random erasing in tf.data. Top-1/top-5 on the validation split every
`eval_every_steps` and at the end; `checkpoints/` keeps the latest states, `best/` the params
of the best evaluation.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from beit_jax.evaluation import classification
from beit_jax.training import optim
from beit_jax import params as params_lib
from beit_jax.training import runner
from beit_jax.training import model_rules
from beit_jax.training import sharding
from beit_jax.training import checkpoint
from beit_jax.training import train_state
from beit_jax.training import validate
from beit_jax.data import classification as data
from beit_jax.errors import ConfigError
from beit_jax.models import vit
from beit_jax.training.train_state import TrainState

# The library modules whose config groups this trainer reads (`runner.Trainer.READS`):
# their RULES and CHECKS run before its own.
READS = (runner, optim, checkpoint, sharding, model_rules, data, classification)
RULES = (
  ("label_smoothing", validate.number(0, 1, hi_open=True), "a number in [0, 1)"),
  ("mixup.mixup_alpha", validate.number(0), "a number >= 0 (0: no Mixup)"),
  ("mixup.cutmix_alpha", validate.number(0), "a number >= 0 (0: no CutMix)"),
  ("mixup.prob", validate.number(0, 1), "a probability in [0, 1]"),
  ("mixup.switch_prob", validate.number(0, 1), "a probability in [0, 1]"),
)


def _check_rel_pos(config: ml_collections.ConfigDict) -> None:
  if config.model.use_shared_rel_pos_bias and config.model.use_rel_pos_bias:
    raise ConfigError(
      "model.use_shared_rel_pos_bias and model.use_rel_pos_bias are both True; "
      "fine-tuning uses one table per block (use_rel_pos_bias)"
    )


CHECKS = (_check_rel_pos,)
prerequisites = runner.no_prerequisites


def preflight(config: ml_collections.ConfigDict, workdir: str) -> None:
  """What needs the outside world, checked before any compute."""
  runner.preflight(config, workdir)
  data.dataset_info(config)


def make_model(
  config: ml_collections.ConfigDict, num_classes: int, *, train: bool = True
) -> vit.VisionTransformer:
  """The ViT + mean-pooling classifier a config describes."""
  return vit.from_config(
    config.model,
    image_size=config.input.image_size,
    train=train,
    num_classes=num_classes,
    head_init_scale=config.model.head_init_scale,
    truncate_init=False,
  )


# --------------------------------------------------------------------------- mixup


def mixup_cutmix(
  rng: jax.Array,
  images: jax.Array,
  labels: jax.Array,
  *,
  num_classes: int,
  mixup_alpha: float,
  cutmix_alpha: float,
  prob: float,
  switch_prob: float,
  label_smoothing: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """timm's Mixup(mode='batch'): one mix of the batch with its reverse.

  With probability `prob` the batch is mixed: CutMix (with probability `switch_prob` when
  both are on; lam ~ Beta(cutmix_alpha), then the box's true area) or Mixup (lam ~
  Beta(mixup_alpha)). Targets are lam * smooth(y) + (1 - lam) * smooth(reversed y).

  Args:
    images: [B, H, W, C].
    labels: int [B].

  Returns:
    (images [B, H, W, C], soft targets [B, num_classes] (rows sum to 1), lam []).
  """
  k_apply, k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(rng, 6)
  h, w = images.shape[1:3]
  lam_mix = (
    jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
  )
  if cutmix_alpha > 0:
    use_cutmix = (jax.random.uniform(k_switch) < switch_prob) if mixup_alpha > 0 else True
    lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha)
  else:
    use_cutmix, lam_cut = False, jnp.float32(1.0)
  # timm's rand_bbox: a box of sides int(side * sqrt(1 - lam)) around a uniform centre,
  # clipped to the image; lam is then 1 - its area.
  ratio = jnp.sqrt(1.0 - lam_cut)
  cut_h, cut_w = jnp.floor(h * ratio).astype(jnp.int32), jnp.floor(w * ratio).astype(jnp.int32)
  cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # [H, W]
  lam_box = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)

  reverse = images[::-1]
  mixed = jnp.where(
    use_cutmix,
    jnp.where(box[None, :, :, None], reverse, images),
    lam_mix * images + (1.0 - lam_mix) * reverse,
  )
  apply = jax.random.uniform(k_apply) < prob
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0)
  images = jnp.where(apply, mixed, images)
  off = label_smoothing / num_classes
  smooth = lambda y: jax.nn.one_hot(y, num_classes) * (1.0 - label_smoothing) + off
  targets = lam * smooth(labels) + (1.0 - lam) * smooth(labels[::-1])
  return images, targets, lam


# --------------------------------------------------------------------------- steps


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  frozen: dict[str, Any],
  *,
  model: vit.VisionTransformer,
  tx,
  schedule,
  mix: Callable,
  accum_steps: int = 1,
) -> tuple[TrainState, dict]:
  """One fine-tuning step: mix the batch, soft-target cross-entropy, AdamW update.

  Mixup/CutMix pairs the whole batch (before any split into `accum_steps` micro-batches,
  `train_state.value_and_grad`), so accumulation gives the whole batch's loss and gradient.
  """
  del frozen
  mix_rng, drop_rng = jax.random.split(rng)
  images, targets, _ = mix(mix_rng, batch["image"], batch["label"])

  def loss_fn(params, micro, rng):
    logits = model.apply({"params": params}, micro["image"], train=True, rngs={"dropout": rng})[
      "logits"
    ]
    # Against the dominant label of each mixed target.
    accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(micro["target"], -1))
    return (
      optax.softmax_cross_entropy(logits, micro["target"]).mean(),
      ({"train_accuracy": accuracy}, {}),
    )

  (loss, (aux, _)), grads = train_state.value_and_grad(
    loss_fn, state.params, {"image": images, "target": targets}, drop_rng, accum_steps
  )
  new_state, metrics = train_state.apply_gradients(state, grads, loss, tx)
  metrics.update(
    loss=loss,
    learning_rate=schedule(state.step),
    param_norm=optax.global_norm(new_state.params),
    **aux,
  )
  return new_state, metrics


def eval_step(
  params: Any, batch: dict[str, jax.Array], frozen: dict[str, Any], *, model: vit.VisionTransformer
) -> dict[str, jax.Array]:
  del frozen
  logits = model.apply({"params": params}, batch["image"], train=False)["logits"]
  return classification.classification_sums(logits, batch["label"], batch["valid"])


def make_task(
  config: ml_collections.ConfigDict,
  workdir: str | None = None,
  *,
  frozen: runner.FrozenModels | None = None,
) -> runner.Task:
  """The fine-tuning run of `config` (`runner.Trainer`): no frozen model, nothing read
  from `workdir`."""
  del workdir
  runner.given_frozen(frozen, "Fine-tune")
  info = data.dataset_info(config)
  total_steps, warmup_steps = train_state.steps_from_config(config, info.num_train)
  model = make_model(config, info.num_classes)
  tx, schedule = optim.make_optimizer(
    config.optim,
    total_steps=total_steps,
    warmup_steps=warmup_steps,
    lr_scale_fn=functools.partial(
      optim.layer_decay_scales, depth=model.depth, decay=config.optim.layer_decay
    ),
  )
  size = config.input.image_size
  mixup = config.mixup
  mix = functools.partial(
    mixup_cutmix,
    num_classes=info.num_classes,
    mixup_alpha=mixup.mixup_alpha,
    cutmix_alpha=mixup.cutmix_alpha,
    prob=mixup.prob,
    switch_prob=mixup.switch_prob,
    label_smoothing=config.label_smoothing,
  )
  eval_model = make_model(config, info.num_classes, train=False)
  logging.info(
    "Fine-tuning %s: %d training / %d validation images, %d classes, %d steps "
    "(warmup %d), layer decay %s",
    config.model.variant,
    info.num_train,
    info.num_eval,
    info.num_classes,
    total_steps,
    warmup_steps,
    config.optim.layer_decay,
  )
  if not config.get("init_from"):
    logging.warning("No init_from: fine-tuning a randomly initialised model")

  def init_params(rng):
    return model.init({"params": rng}, jnp.zeros((1, size, size, 3), jnp.float32))["params"]

  return runner.Task(
    desc="Fine-tune",
    init_params=init_params,
    tx=tx,
    param_axes=vit.PARAM_AXES,
    train_step=functools.partial(
      train_step,
      model=model,
      tx=tx,
      schedule=schedule,
      mix=mix,
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
      functools.partial(
        params_lib.load_into,
        path=config.init_from,
        vit=params_lib.ViTFit.of(config),
        drop=params_lib.OTHER_USES,
        fresh=params_lib.CLASSIFIER,
      )
      if config.get("init_from")
      else None
    ),
    hooks=lambda ctx: (
      classification.evaluation_hook(
        ctx, config, "Fine-tune", functools.partial(eval_step, model=eval_model)
      ),
    ),
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) fine-tuning in `workdir`; returns the last and best metrics."""
  return runner.run(config, workdir, make_task(config, workdir))
