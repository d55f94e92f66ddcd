"""Classification evaluation shared by fine-tuning and linear probing.

Top-1 / top-5 / loss over a full, padded pass of the validation split; `best/` keeps the
params of the best evaluation; `results.json` the last and best metrics. `evaluation_hook`
turns these into a runner hook (every `eval_every_steps` and at the end).
"""

import json
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from beit_jax.training import checkpoint
from beit_jax.training import runner
from beit_jax.training import sharding
from beit_jax.training import validate
from beit_jax.data import classification as data

# The evaluation hook's fields (segmentation's evaluation reads them too).
RULES = (
  ("eval_every_steps", *validate.POSITIVE_INT),
  (
    "input.eval_batch_size",
    lambda v: v in (None, 0) or validate.number(1, integer=True)(v),
    "an integer >= 1 (None or 0: input.batch_size)",
  ),
)


def classification_sums(
  logits: jax.Array, labels: jax.Array, valid: jax.Array
) -> dict[str, jax.Array]:
  """Sums over the valid rows of a batch: top-1 / top-5 hits, cross-entropy, count.

  Args:
    logits: [B, C]; labels: int [B]; valid: bool [B] (False for padding).
  """
  weight = valid.astype(jnp.float32)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]  # [B, k]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return {
    "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * weight),
    "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * weight),
    "loss": jnp.sum(ce * weight),
    "examples": jnp.sum(weight),
  }


def evaluate(
  eval_fn: Callable[[Any, dict], dict],
  params: Any,
  data_pass: data.EvalData,
  mesh: jax.sharding.Mesh,
) -> dict[str, float]:
  """top1, top5 (fractions), loss (mean) and examples over a full pass of `data_pass`."""
  sums = None
  for batch in data_pass:
    out = eval_fn(params, sharding.host_to_global(batch, mesh))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = {k: float(v) for k, v in jax.device_get(sums).items()}
  n = max(sums.pop("examples"), 1.0)
  return {**{k: v / n for k, v in sums.items()}, "examples": n}


class BestCheckpoint:
  """`<workdir>/best/`: the params of the evaluation with the highest top-1 so far.

  `params.read(<workdir>/best)` (and so `init_from`) reads them; the meta holds
  the step and the evaluation's metrics.
  """

  def __init__(self, workdir: str, key: str = "top1"):
    self._key = key
    self._manager = checkpoint.make_manager(
      str(epath.Path(workdir) / "best"), every_steps=1, keep=1, async_save=False
    )
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


def evaluation_hook(
  ctx: runner.Context,
  config: ml_collections.ConfigDict,
  desc: str,
  eval_step: Callable[[Any, dict, Any], dict],
  metric_keys: Callable[[dict], dict] = dict,
) -> runner.Hook:
  """Validation every `eval_every_steps` and at the end, keeping `best/` and `results.json`.

  `eval_step(params, batch, frozen)` returns `classification_sums` (per-layer keys are fine
  if `metric_keys` derives top1/top5/loss from them, as the probe's best layer does).
  The hook returns `val_*` of this evaluation and `best_val_*` / `best_step`.
  """
  eval_data = data.EvalData(
    config, process_index=jax.process_index(), process_count=jax.process_count()
  )
  sharding.check_batch_size(
    eval_data.batch_size * jax.process_count(), ctx.mesh, "input.eval_batch_size"
  )
  jitted = jax.jit(
    eval_step,
    in_shardings=(
      ctx.state_shardings.params,
      sharding.batch_sharding(ctx.mesh),
      jax.tree.map(lambda x: x.sharding, ctx.frozen),
    ),
    out_shardings=sharding.replicated(ctx.mesh),
  )
  best = BestCheckpoint(ctx.workdir)
  logging.info("%s: %d validation images", desc, eval_data.num_examples)

  def evaluation(step: int, state) -> dict[str, float]:
    metrics = evaluate(lambda p, b: jitted(p, b, ctx.frozen), state.params, eval_data, ctx.mesh)
    metrics.update(metric_keys(metrics))
    improved = best.update(step, state.params, metrics)
    ctx.writer.write_scalars(step, {f"val_{k}": v for k, v in metrics.items()})
    last = {f"val_{k}": v for k, v in metrics.items()}
    last.update({f"best_val_{k}": v for k, v in best.metrics.items()}, best_step=best.step)
    logging.info(
      "%s: step %d validation top-1 %.4f, top-5 %.4f (%d images)%s",
      desc,
      step,
      metrics["top1"],
      metrics["top5"],
      metrics["examples"],
      " (best so far)" if improved else f"; best {best.value:.4f} at {best.step}",
    )
    if jax.process_index() == 0:
      (epath.Path(ctx.workdir) / "results.json").write_text(
        json.dumps(dict(last, step=step), indent=2)
      )
    return last

  return runner.Hook(config.eval_every_steps, evaluation, best.close)
