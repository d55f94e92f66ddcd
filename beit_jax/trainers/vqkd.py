"""BEiT v2 stage 1: train the VQ-KD tokenizer to reconstruct a frozen teacher's features.

unilm's recipe (docs/reference.md §3, `configs/vqkd_clip_base.py`): each crop is shown
twice, to VQ-KD in [-1, 1] and to the teacher in its own normalisation (two views of one
crop, flipped alike); loss = (1 - cos(decoder output, teacher patch features)) + beta *
commitment. AdamW on the encoder and decoder; the codebook is not trained by gradient.

The codebook lives in the train state's params next to the module's params,
`{'params': ..., 'codebook': {embedding, cluster_size, initted}}` (what
`tokenizers.load` reads back as a VQ-KD tokenizer). The optimizer leaves it alone
(`optim.make_optimizer(frozen=('codebook',))`: no Adam moments and no weight decay);
each step it is k-means-initialised on the first batch (cosine k-means, unilm's
`kmeans_init`), then moved by EMA (decay 0.99) with the step's assignments, after the
optimizer update and only on a finite step: a step `train_state.apply_gradients` skips
leaves the codebook bit-identical too (a skipped first step leaves it un-initialised).

Data parallelism: the step is one `jax.jit` over globally sharded batches (GSPMD), so
the per-code sums and counts of `models.vqkd.ema_update` / `kmeans_init` are sums over
the global batch, i.e. over every device and process: XLA inserts the all-reduce. Every
device holds the same codebook after every step (tests/test_vqkd_trainer.py checks that
8 devices give the 1-device step's codebook).

A config with `trainer='vqkd'` is the whole run (`configs/vqkd_*.py`; as the first stage of a
v2 MIM run, its `tokenizer.recipe`): `tokenizer` (sizes, `teacher`), `input` (its crops),
`optim`, `total_steps` / `num_epochs` and the codebook's settings (`ema_decay`,
`kmeans_iters`, `restart_dead_codes`, `dead_threshold`). A 'vit' teacher may come with its
own run, `tokenizer.teacher.recipe` (a whole config, e.g.
`configs/finetune_tiny_local.py`'s): without `teacher.init_from` it trains first in
`<workdir>/teacher` (`prerequisites`), so one command runs teacher, VQ-KD and v2 MIM.
"""

import copy
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath

from beit_jax.training import optim
from beit_jax.training import runner
from beit_jax.training import checkpoint
from beit_jax.training import sharding
from beit_jax import tokenizers
from beit_jax.training import train_state
from beit_jax.training import validate
from beit_jax.training import visuals
from beit_jax.convert import teachers as convert_teachers
from beit_jax.data import pretrain as data
from beit_jax.data.views import View
from beit_jax.errors import ConfigError
from beit_jax.models import teachers
from beit_jax.models import vit
from beit_jax.models import vqkd
from beit_jax.training.train_state import TrainState

TEACHER_KINDS = ("clip", "dino", "vit", "random")
# What each teacher kind's checkpoint loads as.
_MODULES = {
  "clip": teachers.ClipVisionTower,
  "dino": teachers.DinoViT,
  "vit": vit.VisionTransformer,
}
_n = validate.number
# The library modules whose config groups this trainer reads (`runner.Trainer.READS`):
# their RULES and CHECKS run before its own.
READS = (runner, optim, checkpoint, sharding, data, tokenizers, visuals)
RULES = (
  (
    "tokenizer.teacher.kind",
    lambda v: v in TEACHER_KINDS,
    f"one of {TEACHER_KINDS} ('random': a random 1-block ViT, for tests)",
  ),
  (
    "tokenizer.teacher.init_from",
    lambda v: isinstance(v, str),
    "a path (HF CLIP / ViT folder, OpenAI CLIP or DINO file, beit-jax checkpoint)",
  ),
  (
    "tokenizer.teacher.block",
    lambda v: v is None or _n(integer=True)(v),
    "None (the final tokens) or a block index of a 'vit' teacher",
  ),
  ("tokenizer.teacher.num_heads", validate.optional_positive_int, "None or an integer >= 1"),
  (
    "tokenizer.teacher.recipe",
    lambda v: isinstance(v, ml_collections.ConfigDict) and v.get("trainer") in ("finetune", "mim"),
    "a config whose trainer ('finetune' or 'mim') makes the ViT teacher",
  ),
  ("ema_decay", _n(0, 1, lo_open=True, hi_open=True), "a number in (0, 1)"),
  ("kmeans_iters", _n(0, integer=True), "an integer >= 0"),
  ("restart_dead_codes", lambda v: isinstance(v, bool), "True or False"),
  ("dead_threshold", _n(0, lo_open=True), "a number > 0"),
)


def _check_sizes(config: ml_collections.ConfigDict) -> None:
  tok, inp = config.tokenizer, config.input
  if tok.kind != "vqkd":
    raise ConfigError(f"tokenizer.kind={tok.kind!r}: trainer='vqkd' trains a 'vqkd' tokenizer")
  for part in ("encoder", "decoder"):
    width, heads = tok[part].width, tok[part].num_heads
    if width % heads:
      raise ConfigError(
        f"tokenizer.{part}.width={width} must be divisible by tokenizer.{part}.num_heads={heads}"
      )
  if tok.patch_size != inp.patch_size:
    raise ConfigError(
      f"tokenizer.patch_size={tok.patch_size} must equal input.patch_size="
      f"{inp.patch_size} (the token grid is input.tokenizer_image_size / "
      "input.patch_size)"
    )
  if inp.tokenizer_image_size % tok.patch_size:
    raise ConfigError(
      f"input.tokenizer_image_size={inp.tokenizer_image_size} must be a "
      f"multiple of tokenizer.patch_size={tok.patch_size}"
    )
  if tok.teacher.block is not None and tok.teacher.kind != "vit":
    raise ConfigError(
      f"tokenizer.teacher.block={tok.teacher.block} needs "
      f"tokenizer.teacher.kind='vit', not {tok.teacher.kind!r}"
    )
  if _recipe(config) is not None:
    _check_recipe(config)


def _recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The teacher's own run, if it is to be trained here (no `teacher.init_from`)."""
  teacher = config.tokenizer.teacher
  return None if teacher.init_from else teacher.get("recipe")


def _check_recipe(config: ml_collections.ConfigDict) -> None:
  """The teacher the recipe will make fits this tokenizer: checked before it trains."""
  tok, recipe = config.tokenizer, config.tokenizer.teacher.recipe
  if tok.teacher.kind != "vit":
    raise ConfigError(
      f"tokenizer.teacher.recipe makes a 'vit' teacher, not "
      f"tokenizer.teacher.kind={tok.teacher.kind!r}"
    )
  size = vit.size_kwargs(recipe.model)
  if size["width"] != tok.teacher_dim:
    raise ConfigError(
      f"tokenizer.teacher_dim={tok.teacher_dim} but tokenizer.teacher.recipe "
      f"makes a ViT of width {size['width']} (its model.width)"
    )
  grid, teacher_grid = (
    config.input.tokenizer_image_size // tok.patch_size,
    recipe.input.image_size // size["patch_size"],
  )
  if teacher_grid != grid:
    raise ConfigError(
      f"tokenizer.teacher.recipe.input.image_size={recipe.input.image_size} gives the "
      f"teacher a {teacher_grid}x{teacher_grid} patch grid but the tokenizer's is "
      f"{grid}x{grid} (input.tokenizer_image_size / tokenizer.patch_size)"
    )


CHECKS = (_check_sizes,)


def teacher_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`tokenizer.teacher.init_from`, or `<workdir>/teacher` where its recipe trains it."""
  if _recipe(config) is None:
    return config.tokenizer.teacher.init_from
  return str(epath.Path(workdir) / "teacher")


def prerequisites(
  config: ml_collections.ConfigDict, workdir: str
) -> list[tuple[ml_collections.ConfigDict, str]]:
  """A teacher recipe without `teacher.init_from`: the teacher's run comes first."""
  recipe = _recipe(config)
  return [] if recipe is None else [(copy.deepcopy(recipe), teacher_dir(config, workdir))]


def preflight(config: ml_collections.ConfigDict, workdir: str) -> None:
  runner.preflight(config, workdir)
  teacher = config.tokenizer.teacher
  if teacher.kind != "random" and _recipe(config) is None:
    if not teacher.init_from:
      raise ConfigError(
        f"tokenizer.teacher.init_from is empty: a {teacher.kind!r} teacher "
        "needs its weights (a HF folder, an OpenAI CLIP / DINO file or a "
        "beit-jax checkpoint) or, for 'vit', tokenizer.teacher.recipe"
      )
    if not epath.Path(teacher.init_from).exists():
      raise ConfigError(f"tokenizer.teacher.init_from={teacher.init_from} does not exist")
  data.num_train_examples(config)


def random_teacher(config: ml_collections.ConfigDict) -> teachers.Teacher:
  """kind 'random': a 1-block, 1-head DINO-layout ViT of `tokenizer.teacher_dim` (tests)."""
  tok = config.tokenizer
  return teachers.dino_teacher(
    patch_size=tok.patch_size,
    width=tok.teacher_dim,
    depth=1,
    num_heads=1,
    mlp_dim=2 * tok.teacher_dim,
    image_size=config.input.tokenizer_image_size,
  )


def load_teacher(config: ml_collections.ConfigDict) -> tuple[teachers.Teacher, Any]:
  """The frozen teacher `config.tokenizer.teacher` names, checked against the tokenizer."""
  tok, spec = config.tokenizer, config.tokenizer.teacher
  if spec.kind == "random":
    teacher = random_teacher(config)
    params = teacher.init(jax.random.key(config.seed + 17))
    where = "the random teacher"
  else:
    field = f"tokenizer.teacher.init_from={spec.init_from}"
    teacher, params = convert_teachers.load_teacher(
      spec.init_from, num_heads=spec.get("num_heads"), block=spec.get("block")
    )
    if not isinstance(teacher.module, _MODULES[spec.kind]):
      got = next((k for k, m in _MODULES.items() if isinstance(teacher.module, m)), "?")
      raise ConfigError(f"tokenizer.teacher.kind={spec.kind!r} but {field} is a {got!r} teacher")
    where = f"the teacher at {spec.init_from}"
    logging.info(
      "Teacher: %s from %s (%d-d features, %d patches)",
      spec.kind,
      spec.init_from,
      teacher.dim,
      teacher.num_patches,
    )
  if teacher.dim != tok.teacher_dim:
    raise ConfigError(
      f"tokenizer.teacher_dim={tok.teacher_dim} but {where} gives "
      f"{teacher.dim}-d features (set --config.tokenizer.teacher_dim="
      f"{teacher.dim})"
    )
  grid = config.input.tokenizer_image_size // tok.patch_size
  if teacher.num_patches != grid * grid:
    raise ConfigError(
      f"input.tokenizer_image_size={config.input.tokenizer_image_size} gives a "
      f"{grid}x{grid} token grid but {where} has {teacher.num_patches} patches "
      f"({teacher.image_size} px, patch {teacher.module.patch_size})"
    )
  return teacher, params


def teacher_view(teacher: teachers.Teacher) -> View:
  """The teacher's input: the same crop at its size, bicubic, in its normalisation."""
  return View(teacher.image_size, "bicubic", teacher.normalization)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  frozen: dict[str, Any],
  *,
  model: vqkd.VQKD,
  teacher: teachers.Teacher,
  tx,
  schedule,
  config: ml_collections.ConfigDict,
  accum_steps: int = 1,
) -> tuple[TrainState, dict]:
  """One VQ-KD step: distil the teacher's patch features through the quantised codes.

  batch: 'image' [B, S, S, 3] in [-1, 1] (VQ-KD's view), 'teacher_image' (the teacher's
  view of the same crops). frozen: {'teacher': its params}.

  With `accum_steps` > 1 the teacher, encoder and decoder run on micro-batches
  (`train_state.value_and_grad`) and the codebook moves once, after the update, on the
  whole batch's encoder outputs and codes (EMA, usage, restarts: the whole batch's); the
  k-means initialisation reads the whole batch too. So the step is the whole batch's,
  except for the drop path, whose masks each micro-batch draws itself.
  """
  params, codebook = state.params["params"], state.params["codebook"]
  enc_rng, _, init_rng, restart_rng = jax.random.split(rng, 4)

  def encode(params, images, rng):
    return model.apply(
      {"params": params, "codebook": codebook},
      images,
      True,
      method=vqkd.VQKD.encode,
      rngs={"dropout": rng},
    )  # [B, h, w, C], unit

  # k-means on the first batch's z before its loss, as unilm (a branch once initialised).
  cb = jax.lax.cond(
    codebook["initted"],
    lambda c: c,
    lambda c: vqkd.init_codebook(
      c, encode(params, batch["image"], enc_rng), init_rng, config.kmeans_iters
    ),
    codebook,
  )

  def loss_fn(params, micro, rng):
    enc_rng, dec_rng = jax.random.split(rng, 4)[:2]
    targets = teacher.features(frozen["teacher"], micro["teacher_image"])  # [b, N, T]
    z = encode(params, micro["image"], enc_rng)
    out = model.apply(
      {"params": params, "codebook": codebook},
      z,
      cb["embedding"],
      targets,
      True,
      method=vqkd.VQKD.distill,
      rngs={"dropout": dec_rng},
    )
    return out["loss"], (
      {"cosine_loss": out["cosine_loss"], "commitment_loss": out["commitment_loss"]},
      {"z": z, "codes": out["codes"]},
    )

  (loss, (losses, outputs)), grads = train_state.value_and_grad(
    loss_fn,
    params,
    {"image": batch["image"], "teacher_image": batch["teacher_image"]},
    rng,
    accum_steps,
  )
  z, codes = outputs["z"], outputs["codes"]
  grads = {"params": grads, "codebook": jax.tree.map(jnp.zeros_like, codebook)}
  new_state, update_metrics = train_state.apply_gradients(state, grads, loss, tx)
  ok = update_metrics["skipped_steps"] == 0

  # Sums over the global (sharded) batch: every device and process (see the docstring).
  updated = vqkd.ema_update(cb, z, codes, config.ema_decay)
  usage = vqkd.codebook_usage(updated, codes, config.dead_threshold)
  if config.restart_dead_codes:
    restarted = vqkd.restart_dead_codes(updated, z, restart_rng, config.dead_threshold)
    usage["restarted_codes"] = jnp.sum(jnp.any(restarted["embedding"] != updated["embedding"], -1))
    updated = restarted
  new_codebook = jax.tree.map(lambda n, o: jnp.where(ok, n, o), updated, codebook)
  new_state = new_state.replace(
    params={"params": new_state.params["params"], "codebook": new_codebook}
  )
  metrics = dict(
    update_metrics,
    loss=loss,
    **losses,
    learning_rate=schedule(state.step),
    codebook_perplexity=usage.pop("perplexity"),
    used_fraction=usage["used_codes"] / model.num_codes,
    **usage,
  )
  return new_state, metrics


def make_task(
  config: ml_collections.ConfigDict,
  workdir: str | None = None,
  *,
  frozen: runner.FrozenModels | None = None,
) -> runner.Task:
  """The VQ-KD run of `config`: the teacher (`teacher_dir`) is the step's frozen input;
  `frozen={'teacher': (Teacher, params)}` in its place."""
  frozen = runner.given_frozen(frozen, "VQ-KD", "teacher")
  config = _with_teacher_dir(config, workdir)
  tokenizer = tokenizers.build(config.tokenizer)
  size = config.input.tokenizer_image_size
  model = tokenizer.model.clone(image_size=size)
  teacher, teacher_params = frozen["teacher"] if frozen else load_teacher(config)
  views = {"image": tokenizers.view(config), "teacher_image": teacher_view(teacher)}
  total_steps, warmup_steps = train_state.steps_from_config(config, data.num_train_examples(config))
  # No gradient update at all on the codebook (no moments, no decay): EMA moves it.
  tx, schedule = optim.make_optimizer(
    config.optim, total_steps=total_steps, warmup_steps=warmup_steps, frozen=("codebook",)
  )

  def hooks(ctx: runner.Context):
    images = data.make_eval_batch(
      config, {"image": views["image"]}, n=16, seed=config.seed, masks=False
    )["image"]
    image_dir = epath.Path(ctx.workdir) / "images"

    def write_images(step_no, st):
      visuals.write_code_images(
        image_dir,
        ctx.writer,
        step_no,
        images,
        tokenizer=tokenizer,
        params=st.params,
        view=views["image"],
      )

    return (runner.Hook(config.images_every_steps, write_images),)

  return runner.Task(
    desc="VQ-KD",
    init_params=lambda rng: tokenizer.init(rng, size),
    tx=tx,
    param_axes=vqkd.PARAM_AXES,
    train_step=functools.partial(
      train_step,
      model=model,
      teacher=teacher,
      tx=tx,
      schedule=schedule,
      config=config,
      accum_steps=optim.accum_steps(config),
    ),
    total_steps=total_steps,
    batch_size=config.input.batch_size,
    batches=lambda start: data.make_tokenizer_iterator(
      config,
      views,
      seed=config.seed,
      start_step=start,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    ),
    frozen=lambda mesh: {"teacher": jax.device_put(teacher_params, sharding.replicated(mesh))},
    hooks=hooks,
  )


def _with_teacher_dir(
  config: ml_collections.ConfigDict, workdir: str | None
) -> ml_collections.ConfigDict:
  """`config` whose `teacher.init_from` is the teacher a recipe made in `workdir`."""
  if workdir is None:
    return config
  config = copy.deepcopy(config)
  with config.unlocked():
    config.tokenizer.teacher.init_from = teacher_dir(config, workdir)
  return config


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes training) VQ-KD in `workdir`; returns the last metrics."""
  config = _with_teacher_dir(config, workdir)  # for this run and its config.json
  return runner.run(config, workdir, make_task(config, workdir))
