"""Stage 2: BEiT masked image modeling against a frozen tokenizer's visual tokens.

The tokenizer runs on device inside the train step (no separate tokenisation pass
over the data set); its parameters are an argument of the jitted step, not a
closed-over constant, so they are not baked into the compiled program.

`mim_target='pixels'` is the papers' ablation instead: no tokenizer; the head regresses
each masked patch's pixels, normalised per patch (zero mean, unit variance), by MSE.
"""

import copy
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath

from beit_jax.training import mim_objective
from beit_jax.training.mim_objective import MIM_TARGETS
from beit_jax.training.mim_objective import make_model
from beit_jax.training.mim_objective import masked_positions
from beit_jax.training.mim_objective import objective
from beit_jax.training.mim_objective import predicts_pixels
from beit_jax.training.mim_objective import targets_at
from beit_jax.training import optim
from beit_jax import params as params_lib
from beit_jax.training import runner
from beit_jax.training import model_rules
from beit_jax.training import checkpoint
from beit_jax.training import sharding
from beit_jax import tokenizers
from beit_jax.training import train_state
from beit_jax.training import validate
from beit_jax.training import visuals
from beit_jax.data import pretrain as data
from beit_jax.errors import ConfigError
from beit_jax.models import vit
from beit_jax.training.train_state import TrainState

_PATCH_AGGREGATION_KEYS = ("layer", "depth")


def _is_patch_aggregation(v) -> bool:
  """None or a dict; its fields are `_check_patch_aggregation`'s (one line each)."""
  return v is None or isinstance(v, (dict, ml_collections.ConfigDict))


# The library modules whose config groups this trainer reads (`runner.Trainer.READS`):
# their RULES and CHECKS run before its own.
READS = (runner, optim, checkpoint, sharding, model_rules, data, tokenizers, visuals)
RULES = (
  (
    "mim_target",
    lambda v: v in MIM_TARGETS,
    f"one of {MIM_TARGETS} (the tokenizer's codes, or normalised pixels by MSE)",
  ),
  # BEiT v2 (docs/reference.md §4): read by `make_model`.
  (
    "model.patch_aggregation",
    _is_patch_aggregation,
    "None (BEiT v1) or dict(layer=L, depth=D) of integers >= 1: the [CLS] of the last "
    "block and the patch outputs of the first L blocks (unilm's early_layers) through "
    "D more blocks (unilm's head_layers)",
  ),
)


def _check_token_grid(config: ml_collections.ConfigDict) -> None:
  """The tokenizer must give one token per ViT patch."""
  if predicts_pixels(config):
    return
  patch = config.input.patch_size
  grid = config.input.image_size // patch
  tok_grid = tokenizers.grid(config)
  if tok_grid != grid:
    raise ConfigError(
      f"input.tokenizer_image_size={config.input.tokenizer_image_size} gives a "
      f"{tok_grid}x{tok_grid} token grid but the ViT has {grid}x{grid} patches "
      f"(input.image_size={config.input.image_size}, patch {patch})"
    )


def _check_patch_aggregation(config: ml_collections.ConfigDict) -> None:
  pa = config.model.get("patch_aggregation")
  if pa is None:
    return
  if sorted(pa.keys()) != sorted(_PATCH_AGGREGATION_KEYS):
    raise ConfigError(
      f"model.patch_aggregation has fields {sorted(pa.keys())}; accepted: "
      f"exactly {list(_PATCH_AGGREGATION_KEYS)}"
    )
  for key in _PATCH_AGGREGATION_KEYS:
    if not validate.number(1, integer=True)(pa[key]):
      raise ConfigError(
        f"model.patch_aggregation.{key}={pa[key]!r} is invalid; accepted: an integer >= 1"
      )
  depth = vit.size_kwargs(config.model)["depth"]
  if not 1 <= pa.layer <= depth:
    raise ConfigError(
      f"model.patch_aggregation.layer={pa.layer} must be in 1..{depth} "
      f"(model.depth): the number of blocks whose output is aggregated"
    )


CHECKS = (_check_token_grid, _check_patch_aggregation)


def tokenizer_dir(config: ml_collections.ConfigDict, workdir: str | None) -> str:
  """`tokenizer.init_from`, or `<workdir>/tokenizer` where stage 1 trains one."""
  if config.tokenizer.get("init_from"):
    return config.tokenizer.init_from
  if workdir is None:
    raise ValueError(
      "MIM: no tokenizer: tokenizer.init_from is empty and no workdir holds "
      "one (give make_task a workdir or frozen={'tokenizer': ...})"
    )
  return str(epath.Path(workdir) / "tokenizer")


def prerequisites(
  config: ml_collections.ConfigDict, workdir: str
) -> list[tuple[ml_collections.ConfigDict, str]]:
  """Without `tokenizer.init_from`, the tokenizer's run, `tokenizer.recipe` (a whole
  config: `trainer='dvae'` or `'vqkd'`), comes first (stage 1), in `<workdir>/tokenizer`."""
  if config.tokenizer.get("init_from") or predicts_pixels(config):
    return []
  tokenizers.check_recipe(config)
  return [(copy.deepcopy(config.tokenizer.recipe), tokenizer_dir(config, workdir))]


def preflight(config: ml_collections.ConfigDict, workdir: str) -> None:
  """What needs the outside world, checked before stage 1 or any compute."""
  runner.preflight(config, workdir)
  source = config.tokenizer.get("init_from")
  if source and not epath.Path(source).exists():
    raise ConfigError(f"tokenizer.init_from={source} does not exist")
  data.num_train_examples(config)  # the data set is there


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  frozen: dict[str, Any],
  *,
  model: vit.VisionTransformer,
  tokenize,
  tx,
  schedule,
  max_masked: int,
  accum_steps: int = 1,
) -> tuple[TrainState, dict]:
  """One MIM step: tokenize view 2, predict the tokens of masked patches of view 1.

  frozen: {'tokenizer': its params}. `tokenize=None`: predict the masked patches'
  normalised pixels of view 1 instead (frozen: {}). With `accum_steps` > 1 the tokenizer and
  the ViT run on micro-batches (`train_state.value_and_grad`), the loss and accuracy weighted
  by each micro-batch's masked patches: the whole batch's mean over its masked patches.
  """
  positions, weights = masked_positions(batch["mask"], max_masked)

  def loss_fn(params, micro, rng):
    tokens = None if tokenize is None else tokenize(frozen["tokenizer"], micro["tokenizer_image"])
    targets = targets_at(micro, micro["positions"], tokens, model.patch_size)  # [b, K(, P)]
    loss, metrics = objective(
      params, model, micro, micro["positions"], targets, micro["weights"], rng
    )
    return loss, (metrics, {} if tokenize is None else {"targets": targets})

  (_, (metrics, outputs)), grads = train_state.value_and_grad(
    loss_fn,
    state.params,
    dict(batch, positions=positions, weights=weights),
    rng,
    accum_steps,
    weight=lambda micro: micro["weights"].sum(),
  )
  metrics["masked_per_image"] = weights.sum(1).mean()  # per image, not per masked patch
  new_state, update_metrics = train_state.apply_gradients(state, grads, metrics["loss"], tx)
  metrics.update(update_metrics)
  metrics.update(param_norm=optax.global_norm(new_state.params), learning_rate=schedule(state.step))
  if tokenize is not None:
    # The accuracy of always predicting the batch's most frequent target: the bar MIM
    # accuracy must clear to mean anything.
    metrics["majority_baseline"] = _majority_rate(outputs["targets"], weights, model.vocab_size)
  return new_state, metrics


def _majority_rate(targets: jax.Array, weights: jax.Array, vocab_size: int) -> jax.Array:
  counts = jnp.zeros((vocab_size,), jnp.float32).at[targets.reshape(-1)].add(weights.reshape(-1))
  return counts.max() / jnp.maximum(weights.sum(), 1.0)


def make_task(
  config: ml_collections.ConfigDict,
  workdir: str | None = None,
  *,
  frozen: runner.FrozenModels | None = None,
) -> runner.Task:
  """The MIM run of `config` against its tokenizer (`tokenizer_dir`), whose params are the
  step's frozen input; `frozen={'tokenizer': (Tokenizer, params)}` in its place. No
  tokenizer for `mim_target='pixels'`."""
  frozen = runner.given_frozen(frozen, "MIM", "tokenizer")
  tokenizer, tok_params = None, None
  if "tokenizer" in frozen:
    tokenizer, tok_params = frozen["tokenizer"]
  elif not predicts_pixels(config):
    tokenizer, tok_params = tokenizers.load(config.tokenizer, tokenizer_dir(config, workdir))
  model = make_model(config)
  total_steps, warmup_steps = train_state.steps_from_config(config, data.num_train_examples(config))
  tx, schedule = optim.make_optimizer(
    config.optim, total_steps=total_steps, warmup_steps=warmup_steps
  )
  size, grid = config.input.image_size, config.input.image_size // config.input.patch_size
  max_masked = mim_objective.max_masked(config)
  view_specs = tokenizers.pretrain_views(config)
  if tokenizer is None:  # pixels: the ViT's view only
    view_specs = {"image": view_specs["image"]}

  def init_params(rng):
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    return model.init({"params": rng}, dummy, jnp.zeros((1, grid * grid), bool))["params"]

  def load_params(params):
    # A v2 run may start from a checkpoint without the shallow decoder (v1, or converted
    # with it dropped): the decoder then starts from its init.
    return params_lib.load_into(params, config.init_from, fresh=(params_lib.DECODER,))

  def frozen_params(mesh):  # the tokenizer's, on every device
    return {"tokenizer": jax.device_put(tok_params, sharding.replicated(mesh))}

  def hooks(ctx: runner.Context):
    eval_batch = data.make_eval_batch(config, view_specs, n=8, seed=config.seed)
    eval_model = make_model(config, train=False)
    image_dir = epath.Path(ctx.workdir) / "images"

    def write_images(step_no, st):
      visuals.write_mim_images(
        image_dir,
        ctx.writer,
        step_no,
        eval_batch,
        model=eval_model,
        params=st.params,
        tokenizer=tokenizer,
        tok_params=ctx.frozen["tokenizer"],
        vit_view=view_specs["image"],
      )

    return (runner.Hook(config.images_every_steps, write_images),) if tokenizer else ()

  return runner.Task(
    desc="MIM",
    init_params=init_params,
    tx=tx,
    param_axes=vit.PARAM_AXES,
    train_step=functools.partial(
      train_step,
      model=model,
      tokenize=tokenizer.tokenize if tokenizer else None,
      tx=tx,
      schedule=schedule,
      max_masked=max_masked,
      accum_steps=optim.accum_steps(config),
    ),
    total_steps=total_steps,
    batch_size=config.input.batch_size,
    batches=lambda start: data.make_pretrain_iterator(
      config,
      view_specs,
      seed=config.seed,
      start_step=start,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    ),
    frozen=frozen_params if tokenizer is not None else None,
    load_params=load_params if config.get("init_from") else None,
    hooks=hooks,
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) MIM pretraining in `workdir`; returns the last metrics."""
  return runner.run(config, workdir, make_task(config, workdir))
