"""Stage 1: train the DALL-E style discrete VAE tokenizer (Gumbel-softmax ELBO).

Recipe of the DALL-E paper: the relaxation temperature is annealed from 1 towards
1/16 and the KL weight is raised from 0 during the first steps; AdamW with warmup and
cosine decay. A config with `trainer='dvae'` is the whole run (`configs/dvae.py`; as the
first stage of a MIM run, its `tokenizer.recipe`): `tokenizer` (the architecture), `input`
(the crops: `input.tokenizer_image_size`), `optim`, `total_steps` and the relaxation's
schedule (`temperature_*`, `kl_*`).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from beit_jax.training import optim
from beit_jax.training import runner
from beit_jax.training import sharding
from beit_jax.training import checkpoint
from beit_jax import tokenizers
from beit_jax.training import train_state
from beit_jax.training import validate
from beit_jax.training import visuals
from beit_jax.data import pretrain as data
from beit_jax.errors import ConfigError
from beit_jax.models import dvae
from beit_jax.training.train_state import TrainState

# The library modules whose config groups this trainer reads (`runner.Trainer.READS`):
# their RULES and CHECKS run before its own.
READS = (runner, optim, checkpoint, sharding, data, tokenizers, visuals)
RULES = (
  ("kl_weight", validate.number(0), "a number >= 0"),
  ("temperature_end", validate.number(0, lo_open=True), "a number > 0"),
  ("temperature_anneal_steps", validate.number(0, integer=True), "an integer >= 0"),
  ("kl_warmup_steps", validate.number(0, integer=True), "an integer >= 0"),
)


def _check_schedule(config: ml_collections.ConfigDict) -> None:
  """Counted as every trainer counts (`train_state.steps_from_config`): `total_steps`, or
  `num_epochs` where it is 0."""
  if not config.get("total_steps") and "num_epochs" not in config:
    raise ConfigError(
      "total_steps=0 and no num_epochs: the dVAE run has no length; set total_steps (or num_epochs)"
    )


CHECKS = (_check_schedule,)
prerequisites = runner.no_prerequisites


def preflight(config: ml_collections.ConfigDict, workdir: str) -> None:
  runner.preflight(config, workdir)
  data.num_train_examples(config)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  frozen: dict[str, Any],
  *,
  model: dvae.DiscreteVAE,
  tx,
  schedule,
  config: ml_collections.ConfigDict,
  accum_steps: int = 1,
) -> tuple[TrainState, dict]:
  """One dVAE step at `state.step`'s temperature and KL weight (so `accum_steps` micro-
  batches, `train_state.value_and_grad`, share them). With accumulation each micro-batch
  draws its own Gumbel noise (`fold_in(rng, i)`): the step is the whole batch's in
  expectation, not sample for sample; the code histogram behind `codebook_perplexity` is
  the whole batch's."""
  del frozen
  temperature = dvae.gumbel_temperature(
    state.step,
    start=config.temperature_start,
    end=config.temperature_end,
    anneal_steps=config.temperature_anneal_steps,
  )
  kl_weight = dvae.kl_weight(
    state.step, start=0.0, end=config.kl_weight, warmup_steps=config.kl_warmup_steps
  )

  def loss_fn(params, micro, rng):
    out = model.apply(
      {"params": params}, micro["image"], temperature=temperature, train=True, rngs={"gumbel": rng}
    )
    loss, metrics = dvae.elbo_loss(out, micro["image"], kl_weight)
    return loss, (dict(metrics, code_histogram=_code_histogram(out["logits"])), {})

  (loss, (metrics, _)), grads = train_state.value_and_grad(
    loss_fn, state.params, {"image": batch["image"]}, rng, accum_steps
  )
  new_state, update_metrics = train_state.apply_gradients(state, grads, loss, tx)
  metrics.update(
    update_metrics,
    loss=loss,
    temperature=temperature,
    kl_weight=kl_weight,
    learning_rate=schedule(state.step),
    codebook_perplexity=_perplexity(metrics.pop("code_histogram")),
  )
  return new_state, metrics


def _code_histogram(logits: jax.Array) -> jax.Array:
  """[V]: the fraction of the batch's latent positions whose hard code is each code."""
  return (
    jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1]).reshape(-1, logits.shape[-1]).mean(0)
  )


def _perplexity(counts: jax.Array) -> jax.Array:
  """exp(entropy) of the batch's hard-code histogram: how many codes are in use."""
  return jnp.exp(-jnp.sum(counts * jnp.log(counts + 1e-10)))


def make_task(
  config: ml_collections.ConfigDict,
  workdir: str | None = None,
  *,
  frozen: runner.FrozenModels | None = None,
) -> runner.Task:
  """The dVAE run of `config` (`runner.Trainer`): no frozen model, nothing read
  from `workdir`."""
  del workdir
  runner.given_frozen(frozen, "dVAE")
  tokenizer = tokenizers.build(config.tokenizer)
  view = tokenizers.view(config)
  total_steps, warmup_steps = train_state.steps_from_config(config, data.num_train_examples(config))
  tx, schedule = optim.make_optimizer(
    config.optim, total_steps=total_steps, warmup_steps=warmup_steps
  )

  def hooks(ctx: runner.Context):
    images = data.make_eval_batch(
      config, {"tokenizer_image": view}, n=8, seed=config.seed, masks=False
    )["tokenizer_image"]
    image_dir = epath.Path(ctx.workdir) / "images"

    def write_images(step_no, st):
      visuals.write_tokenizer_images(
        image_dir, ctx.writer, step_no, images, tokenizer=tokenizer, params=st.params
      )

    return (runner.Hook(config.images_every_steps, write_images),)

  return runner.Task(
    desc="dVAE",
    init_params=lambda rng: tokenizer.init(rng, view.size),
    tx=tx,
    param_axes=dvae.PARAM_AXES,
    train_step=functools.partial(
      train_step,
      model=tokenizer.model,
      tx=tx,
      schedule=schedule,
      config=config,
      accum_steps=optim.accum_steps(config),
    ),
    total_steps=total_steps,
    batch_size=config.input.batch_size,
    batches=lambda start: data.make_tokenizer_iterator(
      config,
      view,
      seed=config.seed,
      start_step=start,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    ),
    hooks=hooks,
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes training) the dVAE in `workdir`; returns the last metrics."""
  return runner.run(config, workdir, make_task(config, workdir))
