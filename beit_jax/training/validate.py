"""The mechanism of start-up checks; the rules themselves live with the code they protect.

A module that reads a config group declares `RULES` (field, test, what is accepted) and,
for checks across fields, `CHECKS` (functions that raise ConfigError). `check` runs them
before any compute, so a bad value stops a run with one line naming the field and what it
accepts. A field missing from the config is skipped: the code that needs it reads it with a
default. Checks that need the outside world (data present, `init_from` readable, devices for
the batch) run where that is known: the trainers' `preflight`.
"""

import math
from typing import Any, Callable, Iterable

import ml_collections

from beit_jax.errors import ConfigError

# (field, test, what is accepted)
Rule = tuple[str, Callable[[Any], bool], str]
Check = Callable[[ml_collections.ConfigDict], None]
_MISSING = object()


def number(
  lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False, integer=False
) -> Callable[[Any], bool]:
  def test(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      return False
    if integer and not float(v).is_integer():
      return False
    return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

  return test


def pair(lo, hi) -> Callable[[Any], bool]:
  """(min, max) with lo <= min <= max <= hi."""
  return lambda v: (
    isinstance(v, (tuple, list))
    and len(v) == 2
    and all(number(lo, hi)(x) for x in v)
    and v[0] <= v[1]
  )


def accepted_by(fn: Callable[[Any], Any]) -> Callable[[Any], bool]:
  """True where `fn(value)` does not raise."""

  def test(value) -> bool:
    try:
      fn(value)
    except (ConfigError, TypeError, ValueError):
      return False
    return True

  return test


def optional_positive_int(v) -> bool:
  return v is None or number(1, integer=True)(v)


POSITIVE_INT = (number(1, integer=True), "an integer >= 1")


def get(config: ml_collections.ConfigDict, field: str):
  """The value at a dotted `field`, or `_MISSING`."""
  node = config
  for key in field.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or key not in node:
      return _MISSING
    node = node[key]
  return node


def _show(value: Any) -> str:
  """The value on one line: a nested config by its trainer, not its hundred fields."""
  if isinstance(value, ml_collections.ConfigDict):
    return f"<a config, trainer={value.get('trainer')!r}>"
  return repr(value)


def check(
  config: ml_collections.ConfigDict, rules: Iterable[Rule] = (), checks: Iterable[Check] = ()
) -> None:
  """Raises ConfigError for the first field that breaks a rule, then runs `checks`."""
  for field, test, accepted in rules:
    value = get(config, field)
    if value is not _MISSING and not test(value):
      raise ConfigError(f"{field}={_show(value)} is invalid; accepted: {accepted}")
  for fn in checks:
    fn(config)
