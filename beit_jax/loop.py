"""The step loop every run shares, and the workdir, writers and progress it reports to.

One loop shape for all trainers (big_vision style), driven by `runner.run`: periodic
metrics (with the MFU of the compiled step), checkpoints and hooks, the stop after too many
non-finite steps, and the stop at a preemption notice with a checkpoint every process saves
at the same step.
"""
from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from beit_jax import checkpoint
from beit_jax import sharding
from beit_jax.errors import Preempted
from beit_jax.errors import TrainingError

if TYPE_CHECKING:  # annotations only: clu's metric_writers package imports TensorFlow
  from clu import metric_writers


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
  """TensorBoard events (through epath: local or gs://) + log lines on process 0; log lines
  elsewhere. Written in a background thread."""
  # Imported by a run, not at the top: clu's metric_writers package imports TensorFlow.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from beit_jax import events  # pylint: disable=g-import-not-at-top
  writers = [metric_writers.LoggingWriter()]
  if jax.process_index() == 0:
    writers.append(events.EventWriter(workdir))
  return metric_writers.AsyncMultiWriter(writers)


class Progress:
  """Step counter with ETA: a live bar on a terminal and in a notebook, periodic log lines
  otherwise."""

  def __init__(self, start: int, total: int, desc: str, log_every_secs: float = 30.0):
    self.total, self.desc = total, desc
    self.start_step, self.start_time = start, time.time()
    self.last_log = 0.0
    self.log_every_secs = log_every_secs
    self.bar = None
    bar = _bar_class()
    if bar is not None and jax.process_index() == 0:
      self.bar = bar(total=total, initial=start, desc=desc, dynamic_ncols=True)

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


def _bar_class():
  """tqdm's bar on a terminal; in a Jupyter kernel (Colab, `beit_jax.train`) tqdm's widget
  where ipywidgets is installed, else its text bar; None elsewhere."""
  # pylint: disable=g-import-not-at-top
  if "ipykernel" in sys.modules and importlib.util.find_spec("ipywidgets"):
    from tqdm import notebook
    return notebook.tqdm
  if sys.stderr.isatty() or "ipykernel" in sys.modules:
    import tqdm
    return tqdm.tqdm
  return None


def _fmt_secs(s: float) -> str:
  if not np.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Means over the steps since the last report (one host transfer per report)."""
  stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *history))
  return {k: float(np.mean(v)) for k, v in stacked.items()}


@contextlib.contextmanager
def preemption_notice(desc: str) -> Iterator[Callable[[int], bool]]:
  """`reached(step)`, to be asked at every step by every process: True at the step where
  all of them save a checkpoint and stop because one was sent SIGTERM (a preemption notice).

  Under `jax.distributed`, its preemption service owns SIGTERM (`initialize` installs a C++
  handler; a Python one would replace it) and the coordination service agrees on the step:
  the fastest process's next one (`multihost_utils.reached_preemption_sync_point`, a local
  check per step, no collective). A single process without it gets a Python handler for the
  duration of the `with` (the previous one is restored after) that raises a flag. Either
  way a second SIGTERM changes nothing: the save under way completes.
  """
  if jax.distributed.is_initialized():
    if not jax.config.jax_enable_preemption_service:
      logging.warning("%s: jax_enable_preemption_service is off: a SIGTERM will not stop "
                      "the run with a checkpoint", desc)
      yield lambda step: False
    else:
      yield multihost_utils.reached_preemption_sync_point
    return
  if threading.current_thread() is not threading.main_thread():
    logging.warning("%s: not in the main thread, where signal handlers live: a SIGTERM "
                    "will not stop the run with a checkpoint", desc)
    yield lambda step: False
    return
  received: list[float] = []

  def on_sigterm(signum, frame):
    del signum, frame
    logging.warning("%s: SIGTERM%s", desc, " again: ignored, the checkpoint is under way"
                    if received else ": saving a checkpoint after this step, then stopping")
    received.append(time.time())
  previous = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    yield lambda step: bool(received)
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


StepFn = Callable[[Any, dict], tuple[Any, dict]]


def run(*, desc: str, state: Any, start_step: int, total_steps: int,
        compile_step: Callable[[Any, dict], tuple[StepFn, float, float | None]],
        batches: Iterator[dict[str, np.ndarray]], mesh: jax.sharding.Mesh,
        writer: metric_writers.MetricWriter, manager, log_every_steps: int,
        global_batch_size: int, workdir: str,
        preempted: Callable[[int], bool] = lambda step: False,
        hooks: tuple[tuple[int, Callable[[int, Any], dict | None]], ...] = (),
        skipped_fn: Callable[[], dict[str, int]] = dict, resumed_meta: dict | None = None,
        max_bad_steps: int = 20,
        inject_nan_steps: tuple[int, ...] = ()) -> dict[str, float]:
  """Runs the train step from `start_step` to `total_steps`.

  Args:
    compile_step: (state, first global batch) -> (the train step compiled for them:
      (state, global batch) -> (state, metrics of scalars); XLA's FLOPs per device of one
      step; the device's peak FLOP/s or None). Called at the first step, so that a finished
      run compiles nothing; `flops_per_step` is logged then, `mfu` at every report.
    workdir: where the checkpoints go, for the message of a preemption.
    preempted: (step) -> whether to save a checkpoint at this step and stop (raising
      `Preempted`); asked at every step (see `preemption_notice`).
    hooks: (every_n_steps, fn(step, state)) run after the step's checkpoint; also
      run once at the end. A dict a hook returns joins the returned metrics.
    skipped_fn: the input pipeline's counts of skipped images (by reason) in this
      process; their totals over the whole run go into each checkpoint's meta.
    resumed_meta: the meta of the checkpoint the run resumed from.
    max_bad_steps: stop (TrainingError) once this many consecutive steps were skipped
      as non-finite; checked at every report and before every checkpoint.
    inject_nan_steps: steps whose batch is replaced by NaNs (to test the above).

  Returns:
    The last reported metrics, and the last metrics each hook returned.
  """
  progress = Progress(start_step, total_steps, desc)
  skipped_before = collections.Counter((resumed_meta or {}).get("skipped_images", {}))
  skipped_base = collections.Counter(skipped_fn())

  def meta() -> dict:
    now = skipped_before + (collections.Counter(skipped_fn()) - skipped_base)
    return {"skipped_images": dict(now)}
  history: list[dict[str, jax.Array]] = []
  summary: dict[str, float] = {}
  reported: dict[str, float] = {}  # the hooks'
  t0, s0 = time.time(), start_step
  train_step, flops, peak = None, 0.0, None
  for step in range(start_step + 1, total_steps + 1):
    batch = next(batches)
    if step in inject_nan_steps:
      batch = {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v
               for k, v in batch.items()}
    batch = sharding.host_to_global(batch, mesh)
    if train_step is None:
      train_step, flops, peak = compile_step(state, batch)
      writer.write_scalars(step, {"flops_per_step": flops})
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
        if peak:  # the step's FLOPs at the measured rate, over what the device could do
          summary["mfu"] = flops * summary["steps_per_sec"] / peak
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
    stop = preempted(step)
    if stop:
      logging.warning("%s: preemption notice: saving a checkpoint at step %d, then stopping",
                      desc, step)
    checkpoint.save(manager, step, state, meta(), force=step == total_steps or stop)
    if stop:
      manager.wait_until_finished()
      progress.close()
      writer.flush()
      raise Preempted(desc, step, workdir)
    for every, fn in hooks:
      if step % every == 0 and step != total_steps:
        reported.update(fn(step, state) or {})
  for _, fn in hooks:
    reported.update(fn(total_steps, state) or {})
  progress.close()
  skipped = meta()["skipped_images"]
  logging.info("%s: finished at step %d; images skipped over the run: %s", desc,
               total_steps, ", ".join(f"{n} {why}" for why, n in skipped.items()) or "none")
  manager.wait_until_finished()
  writer.flush()
  return {**summary, **reported}
