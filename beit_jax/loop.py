"""The pieces every trainer's loop shares: workdir, writers, progress, the step loop.

One loop shape for all trainers (big_vision style): the trainer builds data, model
and a jitted step; `run` drives it with periodic metrics, checkpoints and hooks.
"""
import collections
import json
import sys
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from etils import epath

from beit_jax import checkpoint
from beit_jax import sharding


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks write access, then writes the full config (the run's recipe) to the workdir."""
  checkpoint.check_writable(workdir)
  if jax.process_index() == 0:
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with, from its workdir."""
  def tuples(x):  # configs hold tuples, which JSON wrote as lists
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x
  path = epath.Path(workdir) / "config.json"
  return ml_collections.ConfigDict(tuples(json.loads(path.read_text())))


def make_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard events + log lines on process 0; nothing elsewhere."""
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)


class Progress:
  """Step counter with ETA: a live bar on a terminal, periodic log lines otherwise."""

  def __init__(self, start: int, total: int, desc: str, log_every_secs: float = 30.0):
    self.total, self.desc = total, desc
    self.start_step, self.start_time = start, time.time()
    self.last_log = 0.0
    self.log_every_secs = log_every_secs
    self.bar = None
    if sys.stderr.isatty() and jax.process_index() == 0:
      import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm.tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)

  def update(self, step: int, postfix: dict[str, float] | None = None) -> None:
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      if postfix:
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
      return
    now = time.time()
    if now - self.last_log < self.log_every_secs and step < self.total:
      return
    self.last_log = now
    done = step - self.start_step
    rate = done / max(now - self.start_time, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    extra = " ".join(f"{k}={v:.4g}" for k, v in (postfix or {}).items())
    logging.info("%s: step %d/%d (%.1f%%), %.2f steps/s, ETA %s %s", self.desc, step,
                 self.total, 100 * step / self.total, rate, _fmt_secs(eta), extra)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _fmt_secs(s: float) -> str:
  if not np.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Means over the steps since the last report (one host transfer per report)."""
  stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *history))
  return {k: float(np.mean(v)) for k, v in stacked.items()}


def run(*, desc: str, state: Any, start_step: int, total_steps: int,
        train_step: Callable[[Any, dict], tuple[Any, dict]],
        batches: Iterator[dict[str, np.ndarray]], mesh: jax.sharding.Mesh,
        writer: metric_writers.MetricWriter, manager, log_every_steps: int,
        global_batch_size: int,
        hooks: tuple[tuple[int, Callable[[int, Any], None]], ...] = (),
        skipped_fn: Callable[[], dict[str, int]] = dict, resumed_meta: dict | None = None,
        max_bad_steps: int = 20,
        inject_nan_steps: tuple[int, ...] = ()) -> tuple[Any, dict[str, float]]:
  """Runs `train_step` from `start_step` to `total_steps`.

  Args:
    train_step: jitted (state, global batch) -> (state, metrics of scalars).
    hooks: (every_n_steps, fn(step, state)) run after the step's checkpoint; also
      run once at the end.
    skipped_fn: the input pipeline's counts of skipped images (by reason) in this
      process; their totals over the whole run go into each checkpoint's meta.
    resumed_meta: the meta of the checkpoint the run resumed from.
    max_bad_steps: stop (TrainingError) once this many consecutive steps were skipped
      as non-finite; checked at every report and before every checkpoint.
    inject_nan_steps: steps whose batch is replaced by NaNs (to test the above).

  Returns:
    The final state and the last reported metrics.
  """
  progress = Progress(start_step, total_steps, desc)
  skipped_before = collections.Counter((resumed_meta or {}).get("skipped_images", {}))
  skipped_base = collections.Counter(skipped_fn())

  def meta() -> dict:
    now = skipped_before + (collections.Counter(skipped_fn()) - skipped_base)
    return {"skipped_images": dict(now)}
  history: list[dict[str, jax.Array]] = []
  summary: dict[str, float] = {}
  t0, s0 = time.time(), start_step
  for step in range(start_step + 1, total_steps + 1):
    batch = next(batches)
    if step in inject_nan_steps:
      batch = {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v
               for k, v in batch.items()}
    batch = sharding.host_to_global(batch, mesh)
    state, metrics = train_step(state, batch)
    history.append(metrics)
    if step == start_step + 1:  # leave compilation out of the throughput figures
      jax.block_until_ready(metrics)
      t0, s0 = time.time(), step
    if step % log_every_steps == 0 or step == total_steps:
      summary = mean_metrics(history)
      if step > s0:
        dt = max(time.time() - t0, 1e-9)
        summary["images_per_sec"] = (step - s0) * global_batch_size / dt
        summary["steps_per_sec"] = (step - s0) / dt
      writer.write_scalars(step, summary)
      progress.update(step, {k: summary[k] for k in ("loss",) if k in summary})
      history, t0, s0 = [], time.time(), step
    else:
      progress.update(step)
    logged = step % log_every_steps == 0 or step == total_steps
    if (logged or manager.should_save(step)) and int(state.bad_steps) >= max_bad_steps:
      manager.wait_until_finished()
      raise TrainingError(
          f"{desc}: {int(state.bad_steps)} consecutive steps had a non-finite loss or "
          f"gradient (limit max_bad_steps={max_bad_steps}); stopped at step {step}. The "
          f"last checkpoint ({manager.latest_step()}) holds the last good parameters.")
    checkpoint.save(manager, step, state, meta(), force=step == total_steps)
    for every, fn in hooks:
      if step % every == 0 and step != total_steps:
        fn(step, state)
  for _, fn in hooks:
    fn(total_steps, state)
  progress.close()
  skipped = meta()["skipped_images"]
  logging.info("%s: finished at step %d; images skipped over the run: %s", desc,
               total_steps, ", ".join(f"{n} {why}" for why, n in skipped.items()) or "none")
  manager.wait_until_finished()
  writer.flush()
  return state, summary


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: steps taken (skipped ones included)
  params: Any
  opt_state: Any
  bad_steps: jax.Array     # int32 scalar: consecutive steps skipped as non-finite


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. too many non-finite steps); its checkpoints are intact."""


def apply_gradients(state: TrainState, grads: Any, loss: jax.Array, tx
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
  """The optimizer update, or no change at all when the loss or a gradient is not finite.

  A skipped step leaves params and optimizer state bit-identical (one bad batch
  must not cost the run); it still advances `step`, so the data and random streams
  move on, and it counts in `bad_steps` until a good step resets it.
  """
  grad_norm = optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state),
                         bad_steps=jnp.where(ok, 0, state.bad_steps + 1))
  return new_state, {"grad_norm": grad_norm, "skipped_steps": 1 - ok.astype(jnp.float32)}


def init_train_state(init_params: Callable[[jax.Array], Any], tx, rng: jax.Array,
                     mesh: jax.sharding.Mesh, rules) -> tuple[TrainState, Any]:
  """Initialises params and optimizer state directly in their shardings.

  Returns the state and its shardings (for the jitted step's in/out shardings).
  """
  def init(rng):
    params = init_params(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), bad_steps=jnp.zeros((), jnp.int32))
  abstract = jax.eval_shape(init, rng)
  shardings = sharding.param_shardings(abstract, mesh, rules)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings


def restore_or_keep(manager, state: TrainState, shardings) -> tuple[TrainState, int, dict]:
  """Resumes from the workdir's latest checkpoint if there is one."""
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  restored = checkpoint.restore_latest(manager, abstract)
  if restored is None:
    return state, 0, {}
  state, meta = restored
  logging.info("Resumed from step %d", int(meta["step"]))
  return state, int(meta["step"]), meta
