"""One way to run any trainer: a `Task` in, a resumable, checkpointed, logged run out.

A trainer (a module with the `Trainer` protocol) says what is particular to it -- the
model's init, the optimizer, the train step, its data, the frozen params its step reads (a
tokenizer, a teacher, a backbone: always a dict by name), hooks such as pictures and
evaluation -- and `run` does the rest the same way for all: workdir, mesh, sharded state,
the jitted step (donated state; randomness `fold_in(seed, step)`), orbax checkpoints with
resume, writers, progress and the step loop (its MFU, its stop after too many non-finite
steps, its stop at a preemption notice). `setup` is the part that builds the state and step
without running, for benchmarks and tests; `abstract_setup` builds the same step without
allocating anything, for ahead-of-time plans (`beit_jax.plan`).
"""

from __future__ import annotations

import collections
import dataclasses
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import jax
import ml_collections
import optax
from absl import logging
from etils import epath

from beit_jax.training import checkpoint
from beit_jax.training import hardware
from beit_jax.training import loop
from beit_jax.training import optim
from beit_jax.training import sharding
from beit_jax.training import train_state
from beit_jax.training import validate
from beit_jax.training import workdir as workdir_lib
from beit_jax.errors import ConfigError
from beit_jax.errors import Preempted
from beit_jax.errors import TrainingError
from beit_jax.models.paths import AxesTable
from beit_jax.training.train_state import TrainState

if TYPE_CHECKING:  # annotations only: clu's metric_writers package imports TensorFlow
  from clu import metric_writers

RULES = (
  ("seed", validate.number(integer=True), "an integer"),
  ("num_epochs", validate.number(0, lo_open=True), "a number > 0"),
  ("total_steps", validate.number(0, integer=True), "an integer >= 0 (0: use num_epochs)"),
  ("log_every_steps", *validate.POSITIVE_INT),
  ("max_bad_steps", *validate.POSITIVE_INT),
)


@dataclasses.dataclass(frozen=True)
class Context:
  """What a task's hooks may use, known once the run has started."""

  workdir: str
  mesh: jax.sharding.Mesh
  writer: metric_writers.MetricWriter
  state_shardings: Any
  frozen: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(step, state)` every `every_steps` steps (after that step's checkpoint) and once at
  the end; a dict it returns joins the run's final metrics."""

  every_steps: int
  fn: Callable[[int, TrainState], dict[str, float] | None]
  close: Callable[[], None] = lambda: None


@dataclasses.dataclass(frozen=True)
class Task:
  """What a trainer hands to `run`."""

  desc: str  # names the run in logs and errors, e.g. "MIM"
  init_params: Callable[[jax.Array], Any]  # rng -> params (traced)
  param_axes: AxesTable  # the logical axes of the model's weights: its module's PARAM_AXES
  tx: optax.GradientTransformation
  # (state, global batch, rng, frozen) -> (state, metrics of scalars)
  train_step: Callable[[TrainState, dict, jax.Array, dict[str, Any]], tuple[TrainState, dict]]
  total_steps: int
  batch_size: int  # global
  batches: Callable[[int], Iterator[dict]]  # start step -> this process's batches
  # mesh -> {name: arrays} the step reads but does not train, already placed on the mesh
  frozen: Callable[[jax.sharding.Mesh], dict[str, Any]] | None = None
  # A fresh run's initial params -> the params it starts from (`init_from`)
  load_params: Callable[[Any], Any] | None = None
  hooks: Callable[[Context], Sequence[Hook]] = lambda ctx: ()


# What `make_task` may be given in place of the frozen models it would load:
# {name: (model, params)}, the names those of the step's frozen dict ('tokenizer', 'teacher').
FrozenModels = Mapping[str, tuple[Any, Any]]


@runtime_checkable
class Trainer(Protocol):
  """What a trainer module (`beit_jax/trainers/<name>.py`) provides; `trainers.run` starts
  the one `config.trainer` names. Its train step is `train_step(state, batch, rng, frozen)`,
  `frozen` the dict `Task.frozen` places (empty where it reads none)."""

  # The library modules whose config groups it (its data, model, evaluation) reads: their
  # RULES and CHECKS run before its own, and no others (`trainers.validate_config`).
  READS: tuple[types.ModuleType, ...]
  RULES: tuple[validate.Rule, ...]  # its own fields: (field, test, what is accepted)
  CHECKS: tuple[validate.Check, ...]  # its own checks across fields

  def preflight(self, config: ml_collections.ConfigDict, workdir: str) -> None:
    """What needs the outside world (data, weights, devices), checked before any compute."""

  def prerequisites(
    self, config: ml_collections.ConfigDict, workdir: str
  ) -> list[tuple[ml_collections.ConfigDict, str]]:
    """The runs, (config, workdir), that must finish before this one: a tokenizer, a
    teacher."""

  def make_task(
    self,
    config: ml_collections.ConfigDict,
    workdir: str | None = None,
    *,
    frozen: FrozenModels | None = None,
  ) -> Task:
    """The run of `config` in `workdir`, built but not run; `frozen` in place of the frozen
    models it would load from the config and the workdir (benchmarks, plans, tests)."""

  def train_and_evaluate(self, config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs (or resumes) `config` in `workdir`; returns its last metrics."""


def no_prerequisites(
  config: ml_collections.ConfigDict, workdir: str
) -> list[tuple[ml_collections.ConfigDict, str]]:
  """`Trainer.prerequisites` of a trainer that needs no other run."""
  del config, workdir
  return []


def given_frozen(frozen: FrozenModels | None, desc: str, *names: str) -> dict[str, tuple[Any, Any]]:
  """`make_task`'s `frozen`, checked against the `names` of the frozen models `desc` reads."""
  frozen = dict(frozen or {})
  unknown = sorted(set(frozen) - set(names))
  if unknown:
    raise ValueError(
      f"{desc} reads no frozen model named {unknown}; it reads {list(names) or 'none'}"
    )
  return frozen


@dataclasses.dataclass(frozen=True)
class Setup:
  """The initial state in its shardings and the jitted `step(state, batch, frozen)`.

  From `abstract_setup`, `state` and `frozen` are ShapeDtypeStructs carrying their shardings.
  """

  state: TrainState
  shardings: Any
  step: Any
  frozen: Any


def _jit_step(
  config: ml_collections.ConfigDict,
  task: Task,
  mesh: jax.sharding.Mesh,
  shardings: Any,
  frozen_shardings: Any,
):
  """The run's jitted step: donated state, rng `fold_in(fold_in(key(seed), 1), step)`."""
  step_rng = jax.random.fold_in(jax.random.key(config.seed), 1)

  def step(s, b, f):
    with sharding.activation_rules(mesh, config.sharding):  # the models' constraints
      return task.train_step(s, b, jax.random.fold_in(step_rng, s.step), f)

  return jax.jit(
    step,
    in_shardings=(shardings, sharding.batch_sharding(mesh), frozen_shardings),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def setup(config: ml_collections.ConfigDict, task: Task, mesh: jax.sharding.Mesh) -> Setup:
  rng = jax.random.key(config.seed)
  state, shardings = train_state.create(
    task.init_params, task.tx, jax.random.fold_in(rng, 0), mesh, config.sharding, task.param_axes
  )
  frozen = task.frozen(mesh) if task.frozen else {}
  step = _jit_step(config, task, mesh, shardings, jax.tree.map(lambda x: x.sharding, frozen))
  return Setup(state, shardings, step, frozen)


def abstract_setup(config: ml_collections.ConfigDict, task: Task, mesh: jax.sharding.Mesh) -> Setup:
  """`setup` without allocating: the same jitted step, with the state and the frozen inputs
  as ShapeDtypeStructs in their shardings, ready for `step.lower(state, batch, frozen)`
  (ahead-of-time plans, also for devices this host does not have). `task.frozen` is traced,
  not run, so its inputs may themselves be ShapeDtypeStructs."""
  state, shardings = train_state.abstract(
    task.init_params, task.tx, mesh, config.sharding, task.param_axes
  )
  # Traced on the same devices with explicit axes, so that the shapes keep the placement
  # `task.frozen` gives them; then the same specs on `mesh`.
  explicit = jax.sharding.Mesh(
    mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Explicit,) * mesh.devices.ndim
  )
  frozen = jax.eval_shape(lambda: task.frozen(explicit)) if task.frozen else {}

  def placed(x):
    if not isinstance(x.sharding, jax.sharding.NamedSharding):
      raise ValueError(f"{task.desc}: the placement of a frozen input ({x}) cannot be traced")
    return jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, x.sharding.spec)
    )

  frozen = jax.tree.map(placed, frozen)
  step = _jit_step(config, task, mesh, shardings, jax.tree.map(lambda x: x.sharding, frozen))
  return Setup(state, shardings, step, frozen)


def restore_or_keep(manager, state: TrainState, shardings) -> tuple[TrainState, int, dict]:
  """Resumes from the workdir's latest checkpoint if there is one."""
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )
  restored = checkpoint.restore_latest(manager, abstract)
  if restored is None:
    return state, 0, {}
  state, meta = restored
  logging.info("Resumed from step %d", int(meta["step"]))
  return state, int(meta["step"]), meta


def preflight(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The checks every run needs from the outside world before any compute: the workdir is
  writable, the devices split the batch, `init_from` exists."""
  checkpoint.check_writable(workdir)
  sharding.check_batch_size(
    config.input.batch_size,
    sharding.make_mesh(config.mesh),
    "input.batch_size",
    optim.accum_steps(config),
  )
  if config.get("model") is not None and "variant" in config.model:
    sharding.check_tensor_split(config.model, config.mesh)
  if config.get("init_from") and not epath.Path(config.init_from).exists():
    raise ConfigError(f"init_from={config.init_from} does not exist")


StepFn = Callable[[TrainState, dict], tuple[TrainState, dict]]


def compile_step(
  config: ml_collections.ConfigDict, built: Setup, desc: str, state: TrainState, batch: dict
) -> tuple[StepFn, float, float | None]:
  """`built.step` compiled once for `batch` (the executable a jitted call would build), XLA's
  FLOPs per device of one call, and the devices' peak FLOP/s (None: unknown, said once)."""
  t0 = time.perf_counter()
  compiled = built.step.lower(state, batch, built.frozen).compile()
  flops = hardware.step_flops(compiled, config, batch)
  peak, source = hardware.peak_flops(config.get("model", {}).get("dtype", "float32"))
  if not flops:
    peak, source = None, "XLA gave no FLOP count for this step"
  logging.info(
    "%s: train step compiled in %.1f s: %.4g FLOPs per device and step (XLA); peak %s (%s)%s",
    desc,
    time.perf_counter() - t0,
    flops,
    f"{peak:.4g} FLOP/s per device" if peak else "unknown",
    source,
    "" if peak else ": no mfu is logged",
  )
  return (lambda s, b: compiled(s, b, built.frozen)), flops, peak


def run(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict[str, float]:
  """Runs (or resumes) `task` in `workdir`; returns its last metrics and its hooks' last.

  A SIGTERM to any process (a preemption notice) makes every process save a checkpoint at
  the same step and raise `errors.Preempted` (see `loop.preemption_notice`).
  """
  with loop.preemption_notice(task.desc) as preempted:
    return _run(config, workdir, task, preempted)


def _run(
  config: ml_collections.ConfigDict, workdir: str, task: Task, preempted: Callable[[int], bool]
) -> dict[str, float]:
  """The state (initial, `init_from`'s or resumed), then the step loop to `total_steps`.

  The loop (big_vision's shape): metrics every `log_every_steps` (means since the last
  report, with the MFU of the compiled step, which is compiled at the first step so that a
  finished run compiles nothing); a checkpoint when due, then the hooks, which also run
  once at the end; a stop (`TrainingError`) once `max_bad_steps` consecutive steps were
  skipped as non-finite, checked at every report and before every checkpoint; a stop with
  a checkpoint at the step `preempted(step)` says. Each checkpoint's meta holds the input
  pipeline's counts of skipped images over the whole run.
  """
  workdir_lib.prepare(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(task.batch_size, mesh, "input.batch_size", optim.accum_steps(config))
  built = setup(config, task, mesh)
  manager = checkpoint.make_manager(workdir, **config.checkpoint)
  state = built.state
  if task.load_params is not None and manager.latest_step() is None:
    state = state.replace(params=task.load_params(state.params))
  state, start_step, resumed_meta = restore_or_keep(manager, state, built.shardings)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  desc, total_steps = task.desc, task.total_steps
  logging.info(
    "%s: %.2fM trained parameters, %d steps, mesh %s",
    desc,
    n_params / 1e6,
    total_steps,
    dict(mesh.shape),
  )

  batches = task.batches(start_step)
  writer = loop.make_writer(workdir)
  hooks = task.hooks(Context(workdir, mesh, writer, built.shardings, built.frozen))
  log_every_steps = config.log_every_steps
  max_bad_steps = config.max_bad_steps
  try:
    progress = loop.Progress(start_step, total_steps, desc)
    skipped_before = collections.Counter(resumed_meta.get("skipped_images", {}))
    skipped_base = collections.Counter(batches.skipped_counts())

    def meta() -> dict:
      now = skipped_before + (collections.Counter(batches.skipped_counts()) - skipped_base)
      return {"skipped_images": dict(now)}

    history: list[dict[str, jax.Array]] = []
    summary: dict[str, float] = {}
    reported: dict[str, float] = {}  # the hooks'
    t0, s0 = time.time(), start_step
    train_step, flops, peak = None, 0.0, None
    for step in range(start_step + 1, total_steps + 1):
      batch = sharding.host_to_global(next(batches), mesh)
      if train_step is None:
        train_step, flops, peak = compile_step(config, built, desc, state, batch)
        writer.write_scalars(step, {"flops_per_step": flops})
      state, metrics = train_step(state, batch)
      history.append(metrics)
      if step == start_step + 1:  # leave compilation out of the throughput figures
        jax.block_until_ready(metrics)
        t0, s0 = time.time(), step
      logged = step % log_every_steps == 0 or step == total_steps
      if logged:
        summary = loop.mean_metrics(history)
        if step > s0:
          dt = max(time.time() - t0, 1e-9)
          summary["images_per_sec"] = (step - s0) * task.batch_size / dt
          summary["steps_per_sec"] = (step - s0) / dt
          if peak:  # the step's FLOPs at the measured rate, over what the device could do
            summary["mfu"] = flops * summary["steps_per_sec"] / peak
        writer.write_scalars(step, summary)
        progress.update(step, {k: summary[k] for k in ("loss",) if k in summary})
        history, t0, s0 = [], time.time(), step
      else:
        progress.update(step)
      if (logged or manager.should_save(step)) and int(state.bad_steps) >= max_bad_steps:
        manager.wait_until_finished()
        raise TrainingError(
          f"{desc}: {int(state.bad_steps)} consecutive steps had a non-finite loss or "
          f"gradient (limit max_bad_steps={max_bad_steps}); stopped at step {step}. The "
          f"last checkpoint ({manager.latest_step()}) holds the last good parameters."
        )
      stop = preempted(step)
      if stop:
        logging.warning(
          "%s: preemption notice: saving a checkpoint at step %d, then stopping", desc, step
        )
      checkpoint.save(manager, step, state, meta(), force=step == total_steps or stop)
      if stop:
        manager.wait_until_finished()
        progress.close()
        writer.flush()
        raise Preempted(desc, step, workdir)
      for h in hooks:
        if step % h.every_steps == 0 and step != total_steps:
          reported.update(h.fn(step, state) or {})
    for h in hooks:
      reported.update(h.fn(total_steps, state) or {})
    progress.close()
    skipped = meta()["skipped_images"]
    logging.info(
      "%s: finished at step %d; images skipped over the run: %s",
      desc,
      total_steps,
      ", ".join(f"{n} {why}" for why, n in skipped.items()) or "none",
    )
    manager.wait_until_finished()
    writer.flush()
    return {**summary, **reported}
  finally:
    for h in hooks:
      h.close()
    manager.close()
