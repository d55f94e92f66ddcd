"""One trainer per module; `run` validates a config once and starts the trainer it names.

Here, not in `main`, so that other entry points (experiments, benchmarks) can run configs
without `main`'s command-line flags. A trainer module has the `runner.Trainer` protocol:
`READS` (the library modules whose config groups it reads), `RULES` and `CHECKS` for its
own config fields, `preflight(config, workdir)` for what needs the outside world,
`prerequisites(config, workdir)` for the runs that must finish first,
`make_task(config, workdir=None, *, frozen=None)` and `train_and_evaluate(config, workdir)`.
Trainers never import each other: what they share is in library modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import ml_collections
from absl import logging

from beit_jax.training import validate
from beit_jax.errors import ConfigError

if TYPE_CHECKING:  # the runner imports JAX: not for `--help`
  from beit_jax.training import runner

TRAINERS = ("mim", "dvae", "finetune", "linear_probe", "vqkd", "segmentation")
RULES = (("trainer", lambda v: v in TRAINERS, f"one of {TRAINERS}"),)


def module(name: str) -> runner.Trainer:
  """The trainer module `name` (imported on first use: `--help` pays for no TF/JAX)."""
  return importlib.import_module(f"beit_jax.trainers.{name}")


def _parts(name: str) -> tuple:
  """The modules whose rules and checks a config of trainer `name` runs: its READS, then it."""
  trainer = module(name)
  return (*trainer.READS, trainer)


def trainer_rules(name: str) -> tuple[validate.Rule, ...]:
  """The field rules `validate_config` runs on a config of trainer `name`: the `trainer`
  rule, the RULES of the trainer's READS and its own (a rule of an absent field is
  skipped)."""
  found = list(RULES)
  for part in _parts(name):
    found += [r for r in getattr(part, "RULES", ()) if r not in found]
  return tuple(found)


def trainer_checks(name: str) -> tuple[validate.Check, ...]:
  """The cross-field checks of trainer `name`: its READS' CHECKS, then its own."""
  return tuple(dict.fromkeys(c for part in _parts(name) for c in getattr(part, "CHECKS", ())))


def rules() -> tuple[validate.Rule, ...]:
  """Every field rule some trainer runs (the union of `trainer_rules` over TRAINERS)."""
  return tuple(dict.fromkeys(r for name in TRAINERS for r in trainer_rules(name)))


def validate_config(config: ml_collections.ConfigDict) -> None:
  """The checks of the trainer `config.trainer` names, before any compute: the field rules
  of the groups it reads (`trainer_rules`), then its cross-field checks. Fields it does not
  read are not checked."""
  validate.check(config, RULES)
  if "trainer" not in config:
    raise ConfigError(f"trainer is not set; accepted: one of {TRAINERS}")
  validate.check(config, trainer_rules(config.trainer), trainer_checks(config.trainer))


def make_task(
  config: ml_collections.ConfigDict,
  workdir: str | None = None,
  *,
  frozen: runner.FrozenModels | None = None,
) -> runner.Task:
  """The `runner.Task` of `config.trainer`, built but not run (benchmarks, plans, tests);
  `frozen` as `runner.Trainer.make_task` takes it. `config` is not checked here: callers
  run `validate_config` first, as `run`, the benchmark and the plan tool do."""
  return module(config.trainer).make_task(config, workdir, frozen=frozen)


def _runs(config: ml_collections.ConfigDict, workdir: str) -> list:
  """The runs a start makes, each config validated once, prerequisites first.

  A trainer names the runs that must finish before it (`prerequisites(config, workdir) ->
  [(config, workdir)]`): a MIM run without `tokenizer.init_from` trains its tokenizer first
  in `<workdir>/tokenizer`. A finished prerequisite is resumed and returns at once.
  """
  validate_config(config)
  trainer = module(config.trainer)
  before = trainer.prerequisites(config, workdir)
  return [r for c, w in before for r in _runs(c, w)] + [(trainer, config, workdir)]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validates `config`, runs the trainer `config.trainer` names; returns its last metrics.

  Every check runs before any compute, the prerequisites' included (see `_runs`).
  """
  runs = _runs(config, workdir)
  for trainer, cfg, path in runs:
    trainer.preflight(cfg, path)
  for trainer, cfg, path in runs[:-1]:
    logging.info("Before %s: %s in %s", runs[-1][1].trainer, cfg.trainer, path)
    trainer.train_and_evaluate(cfg, path)
  trainer, cfg, path = runs[-1]
  return trainer.train_and_evaluate(cfg, path)
