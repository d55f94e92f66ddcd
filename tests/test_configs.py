"""The shipped configs: every field can be set from the command line, as the README does."""

import importlib
import pathlib
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(
  p.stem
  for p in (ROOT / "configs").glob("*.py")
  if p.stem not in ("__init__", "common", "from_workdir")
)


def _bare_nones(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Fields holding a plain None: ml_collections refuses to override those from flags."""
  found = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      found += _bare_nones(value, f"{prefix}{key}.")
    elif value is None:
      try:
        config.get_ref(key)  # a placeholder's typed reference
      except ValueError:
        found.append(prefix + key)
  return found


@pytest.mark.parametrize("name", CONFIGS)
def test_no_field_is_a_bare_none(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  assert not _bare_nones(config), f"configs/{name}.py: use config_dict.placeholder(type)"


def test_unset_fields_parse_from_the_command_line(monkeypatch):
  argv = [
    "prog",
    f"--config={ROOT / 'configs' / 'beit_base.py'}",
    "--config.input.data_dir=gs://bucket/tensorflow_datasets",
    "--config.model.depth=2",
    "--config.input.mask.max_aspect=3.0",
  ]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values)
  values(argv)
  assert values.config.input.data_dir == "gs://bucket/tensorflow_datasets"
  assert values.config.model.depth == 2 and values.config.input.mask.max_aspect == 3.0
  assert values.config.model.width is None  # unset stays None for the code that reads it
