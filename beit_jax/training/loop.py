"""What the step loop (`runner.run`) reports to and listens to: the metric writers, the
progress bar, the means of a report, and the preemption notice that stops every process at
the same step."""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

if TYPE_CHECKING:  # annotations only: clu's metric_writers package imports TensorFlow
  from clu import metric_writers


def make_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard events (through epath: local or gs://) + log lines on process 0; log lines
  elsewhere. Written in a background thread."""
  # Imported by a run, not at the top: clu's metric_writers package imports TensorFlow.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from beit_jax.training import events  # pylint: disable=g-import-not-at-top

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
    logging.info(
      "%s: step %d/%d (%.1f%%), %.2f steps/s, ETA %s %s",
      self.desc,
      step,
      self.total,
      100 * step / self.total,
      rate,
      _fmt_secs(eta),
      extra,
    )

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
      logging.warning(
        "%s: jax_enable_preemption_service is off: a SIGTERM will not stop "
        "the run with a checkpoint",
        desc,
      )
      yield lambda step: False
    else:
      yield multihost_utils.reached_preemption_sync_point
    return
  if threading.current_thread() is not threading.main_thread():
    logging.warning(
      "%s: not in the main thread, where signal handlers live: a SIGTERM "
      "will not stop the run with a checkpoint",
      desc,
    )
    yield lambda step: False
    return
  received: list[float] = []

  def on_sigterm(signum, frame):
    del signum, frame
    logging.warning(
      "%s: SIGTERM%s",
      desc,
      " again: ignored, the checkpoint is under way"
      if received
      else ": saving a checkpoint after this step, then stopping",
    )
    received.append(time.time())

  previous = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    yield lambda step: bool(received)
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
