"""A run's workdir: the config it was started with (`config.json`), written once and read back.

What else a workdir holds is written by its owners: `checkpoints/` (`checkpoint`), TensorBoard
events (`loop.make_writer`), `images/` and a trainer's prerequisite runs (`tokenizer/`,
`teacher/`), `best/` and `results.json` (`classification`, `segmentation`).
"""

import json

import jax
import ml_collections
from etils import epath

from beit_jax.training import checkpoint

CONFIG_FILE = "config.json"


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks write access, then writes the full config (the run's recipe) to the workdir."""
  checkpoint.check_writable(workdir)
  if jax.process_index() == 0:
    (epath.Path(workdir) / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with, from its workdir."""

  def tuples(x):  # configs hold tuples, which JSON wrote as lists
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x

  path = epath.Path(workdir) / CONFIG_FILE
  return ml_collections.ConfigDict(tuples(json.loads(path.read_text())))
