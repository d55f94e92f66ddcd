"""Linear probing: linear classifiers on the frozen features of a ViT (SPEC §5).

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

from beit_jax import checkpoint
from beit_jax import classification_pipeline
from beit_jax import loop
from beit_jax import optim
from beit_jax import sharding
from beit_jax.errors import ConfigError
from beit_jax.models import vit
from beit_jax.trainers import finetune

POOLS = ("cls", "mean", "cls+mean")
NORMS = ("none", "layernorm")


def make_backbone(config: ml_collections.ConfigDict) -> vit.VisionTransformer:
  """The ViT of `config.model` without heads (inference only: no drop path)."""
  m = config.model
  kwargs = vit.variant_kwargs(m.variant, **{k: m.get(k) for k in
                                            ("width", "depth", "num_heads", "mlp_dim")})
  return vit.VisionTransformer(
      **kwargs, image_size=config.input.image_size, use_abs_pos_emb=m.use_abs_pos_emb,
      use_shared_rel_pos_bias=m.use_shared_rel_pos_bias,
      use_rel_pos_bias=m.get("use_rel_pos_bias", False), layer_scale_init=m.layer_scale_init,
      dtype=jnp.dtype(m.get("dtype", "float32")))


def probed_layers(config: ml_collections.ConfigDict, depth: int) -> tuple[int, ...]:
  """`probe.layers` as sorted 0-based block indices (negative ones count from the end;
  none: every block)."""
  layers = tuple(config.probe.layers) or tuple(range(depth))
  bad = [i for i in layers if not -depth <= i < depth]
  if bad:
    raise ConfigError(f"probe.layers={layers} must be block indices in [{-depth}, "
                      f"{depth - 1}] (the model has {depth} blocks)")
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
        features = nn.LayerNorm(1e-6, use_bias=False, use_scale=False,
                                name=f"norm_{i}")(features)
      out[i] = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                        name=f"head_{i}")(features)
    return out


def _features(backbone: vit.VisionTransformer, backbone_params: Any, images: jax.Array,
              layers: tuple[int, ...]) -> dict[int, jax.Array]:
  hidden = backbone.apply({"params": backbone_params}, images, train=False,
                          return_hidden=layers)["hidden"]
  return jax.lax.stop_gradient(hidden)


def train_step(state: loop.TrainState, batch: dict[str, jax.Array], backbone_params: Any, *,
               backbone: vit.VisionTransformer, heads: ProbeHeads, tx, schedule
               ) -> tuple[loop.TrainState, dict]:
  """One step of every probe: the summed cross-entropy of the per-block classifiers."""
  hidden = _features(backbone, backbone_params, batch["image"], heads.layers)
  labels = batch["label"]

  def loss_fn(params):
    logits = heads.apply({"params": params}, hidden)
    losses = {i: optax.softmax_cross_entropy_with_integer_labels(x, labels).mean()
              for i, x in logits.items()}
    return sum(losses.values()), (logits, losses)

  (loss, (logits, losses)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, metrics = loop.apply_gradients(state, grads, loss, tx)
  metrics.update(loss=loss, learning_rate=schedule(state.step))
  for i in heads.layers:
    metrics[f"loss_layer{i}"] = losses[i]
    metrics[f"train_accuracy_layer{i}"] = jnp.mean(jnp.argmax(logits[i], -1) == labels)
  return new_state, metrics


def eval_step(params: Any, batch: dict[str, jax.Array], backbone_params: Any, *,
              backbone: vit.VisionTransformer, heads: ProbeHeads) -> dict[str, jax.Array]:
  hidden = _features(backbone, backbone_params, batch["image"], heads.layers)
  logits = heads.apply({"params": params}, hidden)
  out = {}
  for i, x in logits.items():
    sums = finetune.classification_sums(x, batch["label"], batch["valid"])
    out["examples"] = sums.pop("examples")
    out.update({f"{k}_layer{i}": v for k, v in sums.items()})
  return out


def best_layer(layers: tuple[int, ...]):
  """Adds top1/top5/loss of the best probed block (and which) to an evaluation's metrics."""
  def derive(metrics: dict[str, float]) -> dict[str, float]:
    i = max(layers, key=lambda j: metrics[f"top1_layer{j}"])
    return {"top1": metrics[f"top1_layer{i}"], "top5": metrics[f"top5_layer{i}"],
            "loss": metrics[f"loss_layer{i}"], "layer": float(i)}
  return derive


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) linear probing in `workdir`; returns the last and best metrics."""
  if config.probe.pool not in POOLS:
    raise ConfigError(f"probe.pool={config.probe.pool!r} is invalid; accepted: {POOLS}")
  if config.probe.norm not in NORMS:
    raise ConfigError(f"probe.norm={config.probe.norm!r} is invalid; accepted: {NORMS}")
  loop.prepare_workdir(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.input.batch_size, mesh)
  info = classification_pipeline.dataset_info(config)
  total_steps, warmup_steps = finetune.steps_from_config(config, info.num_train)

  backbone = make_backbone(config)
  layers = probed_layers(config, backbone.depth)
  heads = ProbeHeads(layers, info.num_classes, config.probe.pool, config.probe.norm)
  size = config.input.image_size
  rng = jax.random.key(config.seed)
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  abstract = jax.eval_shape(lambda r: backbone.init(r, dummy)["params"], rng)
  backbone_shardings = sharding.param_shardings(abstract, mesh, config.sharding_rules)
  backbone_params = jax.jit(lambda r: backbone.init(r, dummy)["params"],
                            out_shardings=backbone_shardings)(jax.random.fold_in(rng, 2))
  if config.get("init_from"):
    # The final norm is unused (blocks' outputs are probed): it may be absent.
    backbone_params = finetune.load_pretrained(config.init_from, backbone_params, config,
                                               fresh=("norm",))
    logging.info("Backbone from %s", config.init_from)
  else:
    logging.warning("No init_from: probing a randomly initialised backbone")

  tx, schedule = optim.make_optimizer(config.optim, total_steps=total_steps,
                                      warmup_steps=warmup_steps)
  width = abstract["cls_token"].shape[-1]
  hidden = {i: jnp.zeros((1, 2, width)) for i in layers}
  state, state_shardings = loop.init_train_state(
      lambda r: heads.init(r, hidden)["params"], tx, jax.random.fold_in(rng, 0), mesh,
      config.sharding_rules)
  step = functools.partial(train_step, backbone=backbone, heads=heads, tx=tx,
                           schedule=schedule)
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(state_shardings, batch_sharding, backbone_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
  eval_jitted = jax.jit(functools.partial(eval_step, backbone=backbone, heads=heads),
                        in_shardings=(state_shardings.params, batch_sharding,
                                      backbone_shardings), out_shardings=replicated)
  manager = checkpoint.make_manager(workdir, **config.checkpoint)
  logging.info("Linear probe of blocks %s (%s pooling, norm %s), %d steps", layers,
               config.probe.pool, config.probe.norm, total_steps)
  return finetune.run_with_evaluation(
      desc="Linear probe", config=config, workdir=workdir, info=info, mesh=mesh, state=state,
      state_shardings=state_shardings, manager=manager,
      train_fn=lambda s, b: jitted(s, b, backbone_params),
      eval_params_fn=lambda st: st.params,
      eval_fn=lambda p, b: eval_jitted(p, b, backbone_params), total_steps=total_steps,
      metric_keys=best_layer(layers))
