"""Every trainer has the `runner.Trainer` protocol: one `make_task` signature, a dict of
frozen inputs for its train step."""

import inspect
import types

import pytest

from beit_jax.training import runner
from beit_jax import trainers


def _params(fn):
  return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", trainers.TRAINERS)
def test_every_trainer_has_the_protocol(name):
  trainer = trainers.module(name)
  assert isinstance(trainer, runner.Trainer)
  assert _params(trainer.make_task) == _params(runner.Trainer.make_task)[1:]  # no self
  assert isinstance(trainer.RULES, tuple) and isinstance(trainer.CHECKS, tuple)
  assert isinstance(trainer.READS, tuple) and trainer.READS  # the library modules it reads
  assert all(isinstance(m, types.ModuleType) for m in trainer.READS)
  # The step's frozen input is one positional dict, never a default.
  frozen = inspect.signature(trainer.train_step).parameters["frozen"]
  assert list(inspect.signature(trainer.train_step).parameters)[:4] == [
    "state",
    "batch",
    "rng",
    "frozen",
  ]
  assert frozen.default is inspect.Parameter.empty


def test_a_frozen_model_a_trainer_does_not_read_is_an_error():
  assert runner.given_frozen(None, "MIM", "tokenizer") == {}
  assert runner.given_frozen({"tokenizer": (1, 2)}, "MIM", "tokenizer") == {"tokenizer": (1, 2)}
  with pytest.raises(ValueError, match=r"Fine-tune reads no frozen model named \['teacher'\]"):
    runner.given_frozen({"teacher": (None, None)}, "Fine-tune")
  assert runner.no_prerequisites(None, "/tmp") == []
