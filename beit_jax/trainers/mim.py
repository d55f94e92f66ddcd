"""Stage 2: BEiT masked image modeling against a frozen tokenizer's visual tokens.

The tokenizer runs on device inside the train step (no separate tokenisation pass
over the data set); its parameters are an argument of the jitted step, not a
closed-over constant, so they are not baked into the compiled program.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath

from beit_jax import checkpoint
from beit_jax import input_pipeline
from beit_jax import loop
from beit_jax import optim
from beit_jax import sharding
from beit_jax import tokenizers
from beit_jax import visuals
from beit_jax import validate as field_rules
from beit_jax.errors import ConfigError
from beit_jax.models import vit


def make_model(config: ml_collections.ConfigDict, *, train: bool = True
               ) -> vit.VisionTransformer:
  """The ViT + MIM head a config describes (vocabulary from the tokenizer)."""
  m = config.model
  kwargs = vit.variant_kwargs(m.variant, **{k: m.get(k) for k in
                                            ("width", "depth", "num_heads", "mlp_dim")})
  return vit.VisionTransformer(
      **kwargs, image_size=config.input.image_size,
      vocab_size=config.tokenizer.vocab_size,
      use_abs_pos_emb=m.use_abs_pos_emb,
      use_shared_rel_pos_bias=m.use_shared_rel_pos_bias,
      layer_scale_init=m.layer_scale_init,
      drop_path_rate=m.drop_path_rate if train else 0.0,
      remat=m.get("remat", False), dtype=jnp.dtype(m.get("dtype", "float32")))


def validate(config: ml_collections.ConfigDict) -> None:
  """Cross-field checks that would otherwise fail deep inside a trace."""
  field_rules.validate(config)
  patch = config.input.patch_size
  grid = config.input.image_size // patch
  tok_grid = tokenizers.grid_size(config.tokenizer, config.input)
  if tok_grid != grid:
    raise ConfigError(
        f"input.tokenizer_image_size={config.input.tokenizer_image_size} gives a "
        f"{tok_grid}x{tok_grid} token grid but the ViT has {grid}x{grid} patches "
        f"(input.image_size={config.input.image_size}, patch {patch})")


def mim_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy averaged over all masked positions of the whole batch.

  Args:
    logits: [B, K, V] at the gathered positions.
    targets: [B, K] visual tokens there.
    weights: [B, K] 1 where the position is really masked (K is a static bound).
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  n = jnp.maximum(weights.sum(), 1.0)
  loss = (ce * weights).sum() / n
  correct = (jnp.argmax(logits, -1) == targets) * weights
  return loss, {"loss": loss, "mim_accuracy": correct.sum() / n,
                "masked_per_image": weights.sum(1).mean()}


def masked_positions(mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The first `k` masked patch indices per image, padded; and their validity.

  Static shapes: K is the most patches a mask can have, so the MIM head only runs on
  K (not N) positions whatever the number masked.
  """
  order = jnp.argsort(~mask, axis=1, stable=True)[:, :k]  # [B, K], masked first
  return order.astype(jnp.int32), jnp.take_along_axis(mask, order, 1).astype(jnp.float32)


def train_step(state: loop.TrainState, batch: dict[str, jax.Array], rng: jax.Array,
               tok_params: Any, *, model: vit.VisionTransformer, tokenize, tx,
               schedule, max_masked: int) -> tuple[loop.TrainState, dict]:
  """One MIM step: tokenize view 2, predict the tokens of masked patches of view 1."""
  tokens = tokenize(tok_params, batch["tokenizer_image"])  # [B, h, w]
  tokens = tokens.reshape(tokens.shape[0], -1)  # [B, N]
  positions, weights = masked_positions(batch["mask"], max_masked)
  targets = jnp.take_along_axis(tokens, positions, 1)  # [B, K]

  def loss_fn(params):
    out = model.apply({"params": params}, batch["image"], batch["mask"], train=True,
                      mim_positions=positions, rngs={"dropout": rng})
    return mim_loss(out["mim_logits"], targets, weights)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, update_metrics = loop.apply_gradients(state, grads, metrics["loss"], tx)
  metrics.update(update_metrics)
  metrics.update(param_norm=optax.global_norm(new_state.params),
                 learning_rate=schedule(state.step),
                 # The accuracy of always predicting the batch's most frequent target:
                 # the bar MIM accuracy must clear to mean anything.
                 majority_baseline=_majority_rate(targets, weights, model.vocab_size))
  return new_state, metrics


def _majority_rate(targets: jax.Array, weights: jax.Array, vocab_size: int) -> jax.Array:
  counts = jnp.zeros((vocab_size,), jnp.float32).at[targets.reshape(-1)].add(
      weights.reshape(-1))
  return counts.max() / jnp.maximum(weights.sum(), 1.0)


def steps_from_config(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(total_steps, warmup_steps): `total_steps` wins over `num_epochs` when set."""
  steps_per_epoch = max(input_pipeline.num_train_examples(config) // config.input.batch_size, 1)
  total = config.get("total_steps") or int(config.num_epochs * steps_per_epoch)
  warmup = config.optim.get("warmup_steps") or int(config.optim.warmup_epochs * steps_per_epoch)
  return total, warmup


def init(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, tokenize
         ) -> tuple[loop.TrainState, Any, Any]:
  """Sharded initial state, its shardings, and the jitted `(state, batch, tok_params)` step."""
  model = make_model(config)
  total_steps, warmup_steps = steps_from_config(config)
  tx, schedule = optim.make_optimizer(config.optim, total_steps=total_steps,
                                      warmup_steps=warmup_steps)
  size, grid = config.input.image_size, config.input.image_size // config.input.patch_size

  def init_params(rng):
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    return model.init({"params": rng}, dummy, jnp.zeros((1, grid * grid), bool))["params"]

  rng = jax.random.key(config.seed)
  state, state_shardings = loop.init_train_state(
      init_params, tx, jax.random.fold_in(rng, 0), mesh, config.sharding_rules)
  step_rng = jax.random.fold_in(rng, 1)
  mask = config.input.mask
  max_masked = max(mask.num_masking_patches, mask.get("max_num_patches") or 0)
  step = functools.partial(train_step, model=model, tokenize=tokenize, tx=tx,
                           schedule=schedule, max_masked=max_masked)
  jitted = jax.jit(
      lambda s, b, t: step(s, b, jax.random.fold_in(step_rng, s.step), t),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0)
  return state, state_shardings, jitted


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) MIM pretraining in `workdir`; returns the last metrics."""
  validate(config)
  loop.prepare_workdir(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.input.batch_size, mesh)
  if config.get("init_from") and not epath.Path(config.init_from).exists():
    raise ConfigError(f"init_from={config.init_from} does not exist")
  total_steps, warmup_steps = steps_from_config(config)  # also checks the data source

  tok_model, tok_params = tokenizers.load_or_train(config, workdir)
  tok_params = jax.device_put(tok_params, sharding.replicated(mesh))
  state, state_shardings, jitted = init(config, mesh, tokenizers.tokenize_fn(tok_model))
  manager = checkpoint.make_manager(workdir, **config.checkpoint)
  if config.get("init_from") and manager.latest_step() is None:
    state = state.replace(params=checkpoint.check_and_cast(
        state.params, checkpoint.load_params(config.init_from), "init_from"))
    logging.info("Parameters initialised from %s", config.init_from)
  state, start_step, resumed_meta = loop.restore_or_keep(manager, state, state_shardings)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("MIM model: %s, %.1fM parameters, %d steps (warmup %d), mesh %s",
               config.model.variant, n_params / 1e6, total_steps, warmup_steps,
               dict(mesh.shape))

  batches = input_pipeline.make_pretrain_iterator(
      config, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())
  writer = loop.make_writer(workdir)
  eval_batch = input_pipeline.make_eval_batch(config, n=8, seed=config.seed)
  image_dir = epath.Path(workdir) / "images"
  eval_model = make_model(config, train=False)

  def write_images(step_no, st):
    visuals.write_mim_images(image_dir, writer, step_no, eval_batch, model=eval_model,
                             params=st.params, tok_model=tok_model, tok_params=tok_params)

  _, summary = loop.run(
      desc="MIM", state=state, start_step=start_step, total_steps=total_steps,
      train_step=lambda s, b: jitted(s, b, tok_params), batches=batches, mesh=mesh,
      writer=writer, manager=manager, log_every_steps=config.log_every_steps,
      global_batch_size=config.input.batch_size,
      hooks=((config.images_every_steps, write_images),),
      skipped_fn=input_pipeline.skipped_counts, resumed_meta=resumed_meta,
      max_bad_steps=config.max_bad_steps, inject_nan_steps=tuple(config.inject_nan_steps))
  manager.close()
  return summary
