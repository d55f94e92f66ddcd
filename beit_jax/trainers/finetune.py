"""Image classification fine-tuning with BEiT's recipe (SPEC §5).

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
import json
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util

from beit_jax import checkpoint
from beit_jax import classification_pipeline
from beit_jax import input_pipeline
from beit_jax import loop
from beit_jax import optim
from beit_jax import sharding
from beit_jax.convert import layout
from beit_jax import validate as field_rules
from beit_jax.errors import ConfigError
from beit_jax.models import vit
from beit_jax.param_paths import path_str

# Layer 0 of the layer-wise lr decay (unilm's get_layer_id_for_vit).
_EMBEDDINGS = ("cls_token", "mask_token", "pos_embed", "patch_embed")
# Params a classifier learns from scratch: not in a pretraining checkpoint.
CLASSIFIER_PARAMS = ("fc_norm", "head")
# Params of a checkpoint a model may lack: heads and final norms of another use.
_DROPPABLE = ("lm_head", "norm", "fc_norm", "head")


def make_model(config: ml_collections.ConfigDict, num_classes: int, *, train: bool = True
               ) -> vit.VisionTransformer:
  """The ViT + mean-pooling classifier a config describes."""
  m = config.model
  kwargs = vit.variant_kwargs(m.variant, **{k: m.get(k) for k in
                                            ("width", "depth", "num_heads", "mlp_dim")})
  return vit.VisionTransformer(
      **kwargs, image_size=config.input.image_size, num_classes=num_classes,
      head_init_scale=m.head_init_scale, use_abs_pos_emb=m.use_abs_pos_emb,
      use_shared_rel_pos_bias=m.use_shared_rel_pos_bias,
      use_rel_pos_bias=m.use_rel_pos_bias, layer_scale_init=m.layer_scale_init,
      drop_path_rate=m.drop_path_rate if train else 0.0, truncate_init=False,
      remat=m.get("remat", False), dtype=jnp.dtype(m.get("dtype", "float32")))


def validate(config: ml_collections.ConfigDict) -> None:
  """Cross-field checks that would otherwise fail deep inside a trace."""
  field_rules.validate(config)
  if config.model.use_shared_rel_pos_bias and config.model.use_rel_pos_bias:
    raise ConfigError("model.use_shared_rel_pos_bias and model.use_rel_pos_bias are both True; "
                      "fine-tuning uses one table per block (use_rel_pos_bias)")


# --------------------------------------------------------------------------- layer decay


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
  """Per-parameter lr multipliers decay^(depth + 1 - layer): 1 for the head."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: decay ** (depth + 1 - layer_id(path_str(p), depth)), params)


# --------------------------------------------------------------------------- mixup


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
                 mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float,
                 label_smoothing: float) -> tuple[jax.Array, jax.Array, jax.Array]:
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
  lam_mix = (jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0
             else jnp.float32(1.0))
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
  mixed = jnp.where(use_cutmix, jnp.where(box[None, :, :, None], reverse, images),
                    lam_mix * images + (1.0 - lam_mix) * reverse)
  apply = jax.random.uniform(k_apply) < prob
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0)
  images = jnp.where(apply, mixed, images)
  off = label_smoothing / num_classes
  smooth = lambda y: jax.nn.one_hot(y, num_classes) * (1.0 - label_smoothing) + off
  targets = lam * smooth(labels) + (1.0 - lam) * smooth(labels[::-1])
  return images, targets, lam


# --------------------------------------------------------------------------- steps


def train_step(state: loop.TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: vit.VisionTransformer, tx, schedule, mix: Callable
               ) -> tuple[loop.TrainState, dict]:
  """One fine-tuning step: mix the batch, soft-target cross-entropy, AdamW update."""
  mix_rng, drop_rng = jax.random.split(rng)
  images, targets, _ = mix(mix_rng, batch["image"], batch["label"])

  def loss_fn(params):
    logits = model.apply({"params": params}, images, train=True,
                         rngs={"dropout": drop_rng})["logits"]
    return optax.softmax_cross_entropy(logits, targets).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, metrics = loop.apply_gradients(state, grads, loss, tx)
  metrics.update(loss=loss, learning_rate=schedule(state.step),
                 param_norm=optax.global_norm(new_state.params),
                 # Against the dominant label of each mixed target.
                 train_accuracy=jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1)))
  return new_state, metrics


def classification_sums(logits: jax.Array, labels: jax.Array, valid: jax.Array
                        ) -> dict[str, jax.Array]:
  """Sums over the valid rows of a batch: top-1 / top-5 hits, cross-entropy, count.

  Args:
    logits: [B, C]; labels: int [B]; valid: bool [B] (False for padding).
  """
  weight = valid.astype(jnp.float32)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]  # [B, k]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return {"top1": jnp.sum((jnp.argmax(logits, -1) == labels) * weight),
          "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * weight),
          "loss": jnp.sum(ce * weight), "examples": jnp.sum(weight)}


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: vit.VisionTransformer
              ) -> dict[str, jax.Array]:
  logits = model.apply({"params": params}, batch["image"], train=False)["logits"]
  return classification_sums(logits, batch["label"], batch["valid"])


def evaluate(eval_fn: Callable[[Any, dict], dict], params: Any,
             data: classification_pipeline.EvalData, mesh: jax.sharding.Mesh
             ) -> dict[str, float]:
  """top1, top5 (fractions), loss (mean) and examples over a full pass of `data`."""
  sums = None
  for batch in data:
    out = eval_fn(params, sharding.host_to_global(batch, mesh))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = {k: float(v) for k, v in jax.device_get(sums).items()}
  n = max(sums.pop("examples"), 1.0)
  return {**{k: v / n for k, v in sums.items()}, "examples": n}


# --------------------------------------------------------------------------- weights


def load_pretrained(path: str, target: Any, config: ml_collections.ConfigDict, *,
                    fresh: tuple[str, ...] = CLASSIFIER_PARAMS, field: str = "init_from"
                    ) -> Any:
  """ViT weights of a beit-jax checkpoint, adapted to the model whose params are `target`.

  The checkpoint's relative position bias becomes per-block (or shared) as the model has
  it, position parameters are resized to `input.image_size`, the MIM head and whatever
  else the model lacks (its final norm under mean pooling, a head of another size) are
  dropped. Params whose top-level name is in `fresh` may be missing (they keep `target`'s
  init); any other missing or misshapen param is a ConfigError.

  Returns:
    `target`'s tree with the loaded values, in its dtypes and shardings.
  """
  what = f"{field}={path}"
  if not epath.Path(path).exists():
    raise ConfigError(f"{what} does not exist")
  params = layout.flat(checkpoint.load_params(path))
  config_file = epath.Path(path) / "config.json"
  saved = json.loads(config_file.read_text()) if config_file.exists() else None
  m = config.model
  kw = layout.infer_model_kwargs(
      params, what, config=saved, num_heads=vit.variant_kwargs(
          m.variant, **{k: m.get(k) for k in ("width", "depth", "num_heads", "mlp_dim")}
      )["num_heads"], fallback_image_size=config.input.image_size)
  source = kw
  rel_pos = ("per_layer" if m.use_rel_pos_bias else
             "shared" if m.use_shared_rel_pos_bias else "keep")
  params, kw = layout.adapt(params, kw, rel_pos=rel_pos, image_size=config.input.image_size)
  if kw["image_size"] != source["image_size"]:
    logging.info("%s: position parameters resized from %d to %d pixels", what,
                 source["image_size"], kw["image_size"])

  want = traverse_util.flatten_dict(target, sep="/")
  top = lambda k: k.split("/")[0]
  misshapen_head = [k for k in params if top(k) in fresh and k in want
                    and tuple(params[k].shape) != tuple(want[k].shape)]
  dropped = sorted(k for k in params if k not in want) + misshapen_head
  params = {k: v for k, v in params.items() if k in want and k not in misshapen_head}
  missing = sorted(k for k in want if k not in params and top(k) not in fresh)
  # Heads and final norms may go; any other weight the model lacks would change its function.
  extra = [k for k in dropped if top(k) not in _DROPPABLE + fresh]
  if missing or extra:
    problem = (f"the checkpoint lacks {_listing(missing)}" if missing else
               f"the model has no place for {_listing(extra)}")
    raise ConfigError(f"{what}: {problem}; set the model fields to the checkpoint's: "
                      f"{layout.config_flags(source)}")
  if dropped:
    logging.info("%s: not used: %s", what, ", ".join(sorted(set(dropped))))
  kept = [k for k in want if k not in params]
  if kept:
    logging.info("%s: initialised from scratch: %s", what, ", ".join(kept))
  full = {k: params.get(k, want[k]) for k in want}
  return checkpoint.check_and_cast(target, traverse_util.unflatten_dict(full, sep="/"), field)


def _listing(names: list[str]) -> str:
  return f"{len(names)} parameters ({', '.join(names[:6])}" + (", ...)" if len(names) > 6 else ")")


class BestCheckpoint:
  """`<workdir>/best/`: the params of the evaluation with the highest top-1 so far.

  `checkpoint.load_params(<workdir>/best)` (and so `init_from`) reads them; the meta holds
  the step and the evaluation's metrics.
  """

  def __init__(self, workdir: str, key: str = "top1"):
    self._key = key
    self._manager = checkpoint.make_manager(str(epath.Path(workdir) / "best"), every_steps=1,
                                            keep=1, async_save=False)
    self.step, self.metrics = None, {}
    step = self._manager.latest_step()
    if step is not None:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      self.step, self.metrics = step, dict(meta.meta.get("metrics", {}))

  @property
  def value(self) -> float:
    return self.metrics.get(self._key, -math.inf)

  def update(self, step: int, params: Any, metrics: dict[str, float]) -> bool:
    """Saves `params` if `metrics[key]` beats the best so far; True if it did."""
    if metrics[self._key] <= self.value or step == self.step:
      return False
    for old in self._manager.all_steps():
      self._manager.delete(old)
    checkpoint.save(self._manager, step, {"params": params}, {"metrics": metrics}, force=True)
    self.step, self.metrics = step, dict(metrics)
    return True

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


# --------------------------------------------------------------------------- the run


def steps_from_config(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int]:
  """(total_steps, warmup_steps): `total_steps` wins over `num_epochs` when set."""
  steps_per_epoch = max(num_train // config.input.batch_size, 1)
  total = config.get("total_steps") or int(config.num_epochs * steps_per_epoch)
  warmup = config.optim.get("warmup_steps") or int(config.optim.warmup_epochs * steps_per_epoch)
  return total, warmup


def init(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_classes: int,
         total_steps: int, warmup_steps: int) -> tuple[loop.TrainState, Any, Any, Any]:
  """Sharded initial state, its shardings, the jitted `(state, batch)` train step and the
  jitted `(params, batch)` eval step."""
  model = make_model(config, num_classes)
  depth = model.depth
  tx, schedule = optim.make_optimizer(
      config.optim, total_steps=total_steps, warmup_steps=warmup_steps,
      lr_scale_fn=functools.partial(layer_decay_scales, depth=depth,
                                    decay=config.optim.layer_decay))
  size = config.input.image_size

  def init_params(rng):
    return model.init({"params": rng}, jnp.zeros((1, size, size, 3), jnp.float32))["params"]

  rng = jax.random.key(config.seed)
  state, state_shardings = loop.init_train_state(
      init_params, tx, jax.random.fold_in(rng, 0), mesh, config.sharding_rules)
  mixup = config.mixup
  mix = functools.partial(
      mixup_cutmix, num_classes=num_classes, mixup_alpha=mixup.mixup_alpha,
      cutmix_alpha=mixup.cutmix_alpha, prob=mixup.prob, switch_prob=mixup.switch_prob,
      label_smoothing=config.label_smoothing)
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, mix=mix)
  step_rng = jax.random.fold_in(rng, 1)
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  train_fn = jax.jit(
      lambda s, b: step(s, b, jax.random.fold_in(step_rng, s.step)),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, replicated), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, model=make_model(config, num_classes,
                                                                  train=False)),
                    in_shardings=(state_shardings.params, batch_sharding),
                    out_shardings=replicated)
  return state, state_shardings, train_fn, eval_fn


def run_with_evaluation(*, desc: str, config: ml_collections.ConfigDict, workdir: str,
                        info: classification_pipeline.DatasetInfo,
                        mesh: jax.sharding.Mesh, state: loop.TrainState, state_shardings: Any,
                        manager, train_fn, eval_params_fn: Callable[[loop.TrainState], Any],
                        eval_fn, total_steps: int, metric_keys: Callable[[dict], dict] = dict
                        ) -> dict[str, float]:
  """`loop.run` with validation every `eval_every_steps` and at the end, and `best/`.

  Shared by fine-tuning and linear probing. `eval_params_fn(state)` is what `eval_fn`
  and `best/` take (the params, or the probe's heads); `metric_keys` adds derived metrics
  to an evaluation's (e.g. the best probed layer).

  Returns:
    The last training metrics, `val_*` of the last evaluation, and `best_val_*` / best_step.
  """
  state, start_step, resumed_meta = loop.restore_or_keep(manager, state, state_shardings)
  batches = classification_pipeline.make_train_iterator(
      config, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())
  eval_data = classification_pipeline.EvalData(
      config, process_index=jax.process_index(), process_count=jax.process_count())
  sharding.check_batch_size(eval_data.batch_size * jax.process_count(), mesh,
                            "input.eval_batch_size")
  writer = loop.make_writer(workdir)
  best = BestCheckpoint(workdir)
  last: dict[str, float] = {}
  logging.info("%s: %d training / %d validation images, %d classes, %d steps", desc,
               info.num_train, info.num_eval, info.num_classes, total_steps)

  def evaluation(step: int, st: loop.TrainState) -> None:
    params = eval_params_fn(st)
    metrics = evaluate(eval_fn, params, eval_data, mesh)
    metrics.update(metric_keys(metrics))
    improved = best.update(step, params, metrics)
    writer.write_scalars(step, {f"val_{k}": v for k, v in metrics.items()})
    last.clear()
    last.update({f"val_{k}": v for k, v in metrics.items()})
    last.update({f"best_val_{k}": v for k, v in best.metrics.items()}, best_step=best.step)
    logging.info("%s: step %d validation top-1 %.4f, top-5 %.4f (%d images)%s", desc, step,
                 metrics["top1"], metrics["top5"], metrics["examples"],
                 " (best so far)" if improved else f"; best {best.value:.4f} at {best.step}")
    if jax.process_index() == 0:
      (epath.Path(workdir) / "results.json").write_text(json.dumps(dict(last, step=step),
                                                                   indent=2))

  _, summary = loop.run(
      desc=desc, state=state, start_step=start_step, total_steps=total_steps,
      train_step=train_fn, batches=batches, mesh=mesh, writer=writer, manager=manager,
      log_every_steps=config.log_every_steps, global_batch_size=config.input.batch_size,
      hooks=((config.eval_every_steps, evaluation),),
      skipped_fn=input_pipeline.skipped_counts, resumed_meta=resumed_meta,
      max_bad_steps=config.max_bad_steps, inject_nan_steps=tuple(config.inject_nan_steps))
  best.close()
  manager.close()
  return {**summary, **last}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) fine-tuning in `workdir`; returns the last and best metrics."""
  validate(config)
  loop.prepare_workdir(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.input.batch_size, mesh)
  info = classification_pipeline.dataset_info(config)
  total_steps, warmup_steps = steps_from_config(config, info.num_train)
  state, state_shardings, train_fn, eval_fn = init(config, mesh, info.num_classes,
                                                   total_steps, warmup_steps)
  manager = checkpoint.make_manager(workdir, **config.checkpoint)
  if config.get("init_from") and manager.latest_step() is None:
    state = state.replace(params=load_pretrained(config.init_from, state.params, config))
    logging.info("Parameters initialised from %s", config.init_from)
  elif manager.latest_step() is None:
    logging.warning("No init_from: fine-tuning a randomly initialised model")
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Fine-tuning %s: %.1fM parameters, %d steps (warmup %d), layer decay %s, "
               "mesh %s", config.model.variant, n_params / 1e6, total_steps, warmup_steps,
               config.optim.layer_decay, dict(mesh.shape))
  return run_with_evaluation(
      desc="Fine-tune", config=config, workdir=workdir, info=info, mesh=mesh, state=state,
      state_shardings=state_shardings, manager=manager, train_fn=train_fn,
      eval_params_fn=lambda st: st.params, eval_fn=eval_fn, total_steps=total_steps)
