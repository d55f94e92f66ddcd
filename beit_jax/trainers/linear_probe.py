"""Linear probing: linear classifiers on the frozen features of a ViT (unilm `run_linear_eval.py`).

As unilm's `run_linear_eval.py`: one linear classifier per probed block, all trained at
once on the same frozen forward pass, from that block's output pooled as [CLS], the mean
of the patch tokens, or both concatenated; optionally standardised by a parameter-free
LayerNorm (no BatchNorm, so no batch statistics). The reported `top1` is the best probed
block's. The backbone comes from `config.init_from` (any beit-jax ViT checkpoint); without
it the probe measures a randomly initialised backbone, the baseline pretraining must beat.
"""

import functools
from typing import Any

import flax.linen as nn
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
from beit_jax.training import checkpoint
from beit_jax.training import sharding
from beit_jax.training import train_state
from beit_jax.training import validate
from beit_jax.data import classification as data
from beit_jax.errors import ConfigError
from beit_jax.models import vit
from beit_jax.training.train_state import TrainState

POOLS = ("cls", "mean", "cls+mean")
NORMS = ("none", "layernorm")


# The library modules whose config groups this trainer reads (`runner.Trainer.READS`):
# their RULES and CHECKS run before its own.
READS = (runner, optim, checkpoint, sharding, model_rules, data, classification)
RULES = (
  (
    "probe.layers",
    lambda v: isinstance(v, (tuple, list)) and all(validate.number(integer=True)(i) for i in v),
    "a list of block indices (empty: every block)",
  ),
  ("probe.pool", lambda v: v in POOLS, f"one of {POOLS}"),
  ("probe.norm", lambda v: v in NORMS, f"one of {NORMS}"),
)
CHECKS = ()
prerequisites = runner.no_prerequisites


def preflight(config: ml_collections.ConfigDict, workdir: str) -> None:
  """What needs the outside world, checked before any compute."""
  runner.preflight(config, workdir)
  data.dataset_info(config)


def make_backbone(config: ml_collections.ConfigDict) -> vit.VisionTransformer:
  """The ViT of `config.model` without heads (inference only: no drop path)."""
  return vit.from_config(config.model, image_size=config.input.image_size)


def probed_layers(config: ml_collections.ConfigDict, depth: int) -> tuple[int, ...]:
  """`probe.layers` as sorted 0-based block indices (negative ones count from the end;
  none: every block)."""
  layers = tuple(config.probe.layers) or tuple(range(depth))
  bad = [i for i in layers if not -depth <= i < depth]
  if bad:
    raise ConfigError(
      f"probe.layers={layers} must be block indices in [{-depth}, "
      f"{depth - 1}] (the model has {depth} blocks)"
    )
  return tuple(sorted({i % depth for i in layers}))


def pool(tokens: jax.Array, how: str) -> jax.Array:
  """[B, N+1, D] block output -> [B, D] ([CLS] or patch mean) or [B, 2D] (both)."""
  cls, mean = tokens[:, 0], jnp.mean(tokens[:, 1:], axis=1)
  return {"cls": cls, "mean": mean, "cls+mean": jnp.concatenate([cls, mean], -1)}[how]


class ProbeHeads(nn.Module):
  """One linear classifier per probed block (unilm: N(0, 0.01) weights, zero bias)."""

  layers: tuple[int, ...]
  num_classes: int
  pool: str = "cls+mean"
  norm: str = "none"

  @nn.compact
  def __call__(self, hidden: dict[int, jax.Array]) -> dict[int, jax.Array]:
    out = {}
    for i in self.layers:
      features = pool(hidden[i], self.pool).astype(jnp.float32)
      if self.norm == "layernorm":
        features = nn.LayerNorm(1e-6, use_bias=False, use_scale=False, name=f"norm_{i}")(features)
      out[i] = nn.Dense(
        self.num_classes, kernel_init=nn.initializers.normal(0.01), name=f"head_{i}"
      )(features)
    return out


def _features(
  backbone: vit.VisionTransformer, backbone_params: Any, images: jax.Array, layers: tuple[int, ...]
) -> dict[int, jax.Array]:
  hidden = backbone.apply({"params": backbone_params}, images, train=False, return_hidden=layers)[
    "hidden"
  ]
  return jax.lax.stop_gradient(hidden)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  frozen: dict[str, Any],
  *,
  backbone: vit.VisionTransformer,
  heads: ProbeHeads,
  tx,
  schedule,
  accum_steps: int = 1,
) -> tuple[TrainState, dict]:
  """One step of every probe: the summed cross-entropy of the per-block classifiers.

  frozen: {'backbone': the ViT's params}. With `accum_steps` > 1 the backbone runs on
  micro-batches too (`train_state.value_and_grad`).
  """

  def loss_fn(params, micro, rng):
    del rng  # no randomness on device: the backbone is frozen, the heads are linear
    hidden = _features(backbone, frozen["backbone"], micro["image"], heads.layers)
    labels = micro["label"]
    logits = heads.apply({"params": params}, hidden)
    metrics = {}
    for i, x in logits.items():
      metrics[f"loss_layer{i}"] = optax.softmax_cross_entropy_with_integer_labels(x, labels).mean()
      metrics[f"train_accuracy_layer{i}"] = jnp.mean(jnp.argmax(x, -1) == labels)
    return sum(metrics[f"loss_layer{i}"] for i in logits), (metrics, {})

  (loss, (probe_metrics, _)), grads = train_state.value_and_grad(
    loss_fn, state.params, {"image": batch["image"], "label": batch["label"]}, rng, accum_steps
  )
  new_state, metrics = train_state.apply_gradients(state, grads, loss, tx)
  metrics.update(loss=loss, learning_rate=schedule(state.step), **probe_metrics)
  return new_state, metrics


def eval_step(
  params: Any,
  batch: dict[str, jax.Array],
  frozen: dict[str, Any],
  *,
  backbone: vit.VisionTransformer,
  heads: ProbeHeads,
) -> dict[str, jax.Array]:
  hidden = _features(backbone, frozen["backbone"], batch["image"], heads.layers)
  logits = heads.apply({"params": params}, hidden)
  out = {}
  for i, x in logits.items():
    sums = classification.classification_sums(x, batch["label"], batch["valid"])
    out["examples"] = sums.pop("examples")
    out.update({f"{k}_layer{i}": v for k, v in sums.items()})
  return out


def best_layer(layers: tuple[int, ...]):
  """Adds top1/top5/loss of the best probed block (and which) to an evaluation's metrics."""

  def derive(metrics: dict[str, float]) -> dict[str, float]:
    i = max(layers, key=lambda j: metrics[f"top1_layer{j}"])
    return {
      "top1": metrics[f"top1_layer{i}"],
      "top5": metrics[f"top5_layer{i}"],
      "loss": metrics[f"loss_layer{i}"],
      "layer": float(i),
    }

  return derive


def make_task(
  config: ml_collections.ConfigDict,
  workdir: str | None = None,
  *,
  frozen: runner.FrozenModels | None = None,
) -> runner.Task:
  """The linear-probe run of `config` (`runner.Trainer`): its frozen backbone comes from
  `init_from`; nothing is read from `workdir`."""
  del workdir
  runner.given_frozen(frozen, "Linear probe")
  info = data.dataset_info(config)
  total_steps, warmup_steps = train_state.steps_from_config(config, info.num_train)
  backbone = make_backbone(config)
  layers = probed_layers(config, backbone.depth)
  heads = ProbeHeads(layers, info.num_classes, config.probe.pool, config.probe.norm)
  size = config.input.image_size
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  tx, schedule = optim.make_optimizer(
    config.optim, total_steps=total_steps, warmup_steps=warmup_steps
  )
  width = vit.size_kwargs(config.model)["width"]
  logging.info(
    "Linear probe of blocks %s (%s pooling, norm %s): %d training / %d validation "
    "images, %d classes, %d steps",
    layers,
    config.probe.pool,
    config.probe.norm,
    info.num_train,
    info.num_eval,
    info.num_classes,
    total_steps,
  )

  def frozen_backbone(mesh):  # {'backbone': its params}
    return {"backbone": backbone_params(mesh)}

  def backbone_params(mesh):
    init = lambda r: backbone.init(r, dummy)["params"]
    shardings = sharding.param_shardings(
      jax.eval_shape(init, jax.random.key(0)), mesh, config.sharding, vit.PARAM_AXES
    )
    params = jax.jit(init, out_shardings=shardings)(
      jax.random.fold_in(jax.random.key(config.seed), 2)
    )
    if not config.get("init_from"):
      logging.warning("No init_from: probing a randomly initialised backbone")
      return params
    logging.info("Backbone from %s", config.init_from)
    # The final norm is unused (blocks' outputs are probed): it may be absent.
    return params_lib.load_into(
      params,
      config.init_from,
      vit=params_lib.ViTFit.of(config),
      drop=params_lib.OTHER_USES,
      fresh=("norm",),
    )

  return runner.Task(
    desc="Linear probe",
    init_params=lambda r: heads.init(r, {i: jnp.zeros((1, 2, width)) for i in layers})["params"],
    param_axes=(),  # ProbeHeads: Dense heads without roles, sharded by size
    tx=tx,
    train_step=functools.partial(
      train_step,
      backbone=backbone,
      heads=heads,
      tx=tx,
      schedule=schedule,
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
    frozen=frozen_backbone,
    hooks=lambda ctx: (
      classification.evaluation_hook(
        ctx,
        config,
        "Linear probe",
        functools.partial(eval_step, backbone=backbone, heads=heads),
        metric_keys=best_layer(layers),
      ),
    ),
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) linear probing in `workdir`; returns the last and best metrics."""
  return runner.run(config, workdir, make_task(config, workdir))
