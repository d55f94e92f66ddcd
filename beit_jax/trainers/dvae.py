"""Stage 1: train the DALL-E style discrete VAE tokenizer (Gumbel-softmax ELBO).

Recipe of the DALL-E paper: the relaxation temperature is annealed from 1 towards
1/16 and the KL weight is raised from 0 during the first steps; AdamW with warmup and
cosine decay. Reads `config.tokenizer` (architecture + `train`) and `config.input`.
"""
import copy
import functools

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath

from beit_jax import checkpoint
from beit_jax import input_pipeline
from beit_jax import loop
from beit_jax import optim
from beit_jax import sharding
from beit_jax import tokenizers
from beit_jax import visuals
from beit_jax.models import dvae


def train_step(state: loop.TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: dvae.DiscreteVAE, tx, schedule, train_cfg: ml_collections.ConfigDict
               ) -> tuple[loop.TrainState, dict]:
  temperature = dvae.gumbel_temperature(
      state.step, start=train_cfg.temperature_start, end=train_cfg.temperature_end,
      anneal_steps=train_cfg.temperature_anneal_steps)
  kl_weight = dvae.kl_weight(state.step, start=0.0, end=train_cfg.kl_weight,
                             warmup_steps=train_cfg.kl_warmup_steps)

  def loss_fn(params):
    out = model.apply({"params": params}, batch["image"], temperature=temperature,
                      train=True, rngs={"gumbel": rng})
    loss, metrics = dvae.elbo_loss(out, batch["image"], kl_weight)
    return loss, (metrics, out["logits"])

  (loss, (metrics, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, update_metrics = loop.apply_gradients(state, grads, loss, tx)
  metrics.update(update_metrics, loss=loss, temperature=temperature, kl_weight=kl_weight,
                 learning_rate=schedule(state.step),
                 codebook_perplexity=_code_perplexity(logits))
  return new_state, metrics


def _code_perplexity(logits: jax.Array) -> jax.Array:
  """exp(entropy) of the batch's hard-code histogram: how many codes are in use."""
  counts = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1]).reshape(
      -1, logits.shape[-1]).mean(0)
  return jnp.exp(-jnp.sum(counts * jnp.log(counts + 1e-10)))


def stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run config as stage 1 sees it: its own batch size, steps and schedule."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.input.batch_size = config.tokenizer.train.batch_size
  return cfg


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes training) the dVAE in `workdir`; returns the last metrics."""
  config = stage_config(config)
  train_cfg = config.tokenizer.train
  loop.prepare_workdir(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.input.batch_size, mesh, "tokenizer.train.batch_size")

  model = tokenizers.build(config.tokenizer)
  total_steps = train_cfg.num_steps
  tx, schedule = optim.make_optimizer(train_cfg.optim, total_steps=total_steps,
                                      warmup_steps=train_cfg.optim.warmup_steps)
  size = config.input.tokenizer_image_size

  def init_params(rng):
    return model.init({"params": rng, "gumbel": rng}, jnp.zeros((1, size, size, 3)),
                      temperature=1.0)["params"]

  rng = jax.random.key(config.seed)
  state, state_shardings = loop.init_train_state(
      init_params, tx, jax.random.fold_in(rng, 0), mesh, config.sharding_rules)
  manager = checkpoint.make_manager(workdir, **train_cfg.checkpoint)
  state, start_step, resumed_meta = loop.restore_or_keep(manager, state, state_shardings)
  if start_step >= total_steps:
    logging.info("dVAE already trained in %s (step %d)", workdir, start_step)
    manager.close()
    return {}

  step_rng = jax.random.fold_in(rng, 1)
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                           train_cfg=train_cfg)
  jitted = jax.jit(lambda s, b: step(s, b, jax.random.fold_in(step_rng, s.step)),
                   in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=0)
  batches = input_pipeline.make_tokenizer_iterator(
      config, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())
  writer = loop.make_writer(workdir)
  eval_images = input_pipeline.make_eval_batch(config, n=8, seed=config.seed)["tokenizer_image"]
  image_dir = epath.Path(workdir) / "images"

  def write_images(step_no, st):
    visuals.write_dvae_images(image_dir, writer, step_no, eval_images, model=model,
                              params=st.params)

  _, summary = loop.run(
      desc="dVAE", state=state, start_step=start_step, total_steps=total_steps,
      train_step=jitted, batches=batches, mesh=mesh, writer=writer, manager=manager,
      log_every_steps=train_cfg.log_every_steps, global_batch_size=config.input.batch_size,
      hooks=((train_cfg.images_every_steps, write_images),),
      skipped_fn=input_pipeline.skipped_counts, resumed_meta=resumed_meta,
      max_bad_steps=config.max_bad_steps, inject_nan_steps=tuple(config.inject_nan_steps))
  manager.close()
  return summary
