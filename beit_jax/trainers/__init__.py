"""One trainer per module; `run` validates a config once and starts the trainer it names.

Here, not in `main`, so that other entry points (experiments, benchmarks) can run configs
without `main`'s command-line flags. A trainer module provides `RULES` (and maybe `CHECKS`)
for its config fields, `preflight(config, workdir)` for what needs the outside world,
`make_task(config, ...)` and `train_and_evaluate(config, workdir)`. Trainers never import
each other: what they share is in library modules.
"""
import importlib
import types

import ml_collections
from etils import epath

from beit_jax import validate

TRAINERS = ("mim", "dvae", "finetune", "linear_probe")
RULES = (("trainer", lambda v: v in TRAINERS, f"one of {TRAINERS}"),)


def module(name: str) -> types.ModuleType:
  """The trainer module `name` (imported on first use: `--help` pays for no TF/JAX)."""
  return importlib.import_module(f"beit_jax.trainers.{name}")


def _library():
  # pylint: disable=g-import-not-at-top
  from beit_jax import checkpoint, classification, optim, runner, tokenizers
  from beit_jax.data import classification as classification_data
  from beit_jax.data import pretrain
  from beit_jax.models import vit
  return (runner, optim, checkpoint, classification, tokenizers, pretrain,
          classification_data, vit)


def rules() -> tuple[validate.Rule, ...]:
  """Every field rule of the library and the trainers (a rule of an absent field is skipped)."""
  found = list(RULES)
  for part in _library() + tuple(module(name) for name in TRAINERS):
    found += [r for r in getattr(part, "RULES", ()) if r not in found]
  return tuple(found)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """The field rules, the library's cross-field checks, then the named trainer's."""
  validate.check(config, rules())
  checks = [c for part in _library() for c in getattr(part, "CHECKS", ())]
  validate.check(config, checks=dict.fromkeys(checks))
  if config.get("trainer") in TRAINERS:
    validate.check(config, checks=getattr(module(config.trainer), "CHECKS", ()))


def make_task(config: ml_collections.ConfigDict, **inputs):
  """The `runner.Task` of `config.trainer`, built but not run (benchmarks, plans, tests)."""
  return module(config.trainer).make_task(config, **inputs)


def _tokenizer_stage(config: ml_collections.ConfigDict, workdir: str):
  """A MIM run without `tokenizer.init_from` trains its tokenizer first: (trainer, dir)."""
  if config.trainer != "mim" or config.tokenizer.get("init_from"):
    return None
  from beit_jax import tokenizers  # pylint: disable=g-import-not-at-top
  return (module(tokenizers.entry(config.tokenizer.kind).trainer),
          str(epath.Path(workdir) / "tokenizer"))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validates `config`, runs the trainer `config.trainer` names; returns its last metrics.

  Every check runs before any compute, stage 1's included: a MIM run without a tokenizer
  trains one in `<workdir>/tokenizer` first (resumed, or skipped once finished).
  """
  validate_config(config)
  trainer = module(config.trainer)
  trainer.preflight(config, workdir)
  stage = _tokenizer_stage(config, workdir)
  if stage is not None:
    stage_trainer, stage_dir = stage
    stage_trainer.preflight(config, stage_dir)
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.info("Stage 1: training the %s tokenizer in %s", config.tokenizer.kind, stage_dir)
    stage_trainer.train_and_evaluate(config, stage_dir)
  return trainer.train_and_evaluate(config, workdir)
