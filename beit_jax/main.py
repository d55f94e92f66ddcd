"""Entry point: `python -m beit_jax.main --config=configs/X.py --workdir=DIR`.

Config overrides work as usual for ml_collections, e.g.
`--config=configs/beit_base.py:variant=L/16 --config.input.batch_size=1024`.
Re-running the same command on the same workdir resumes from its latest checkpoint; a
SIGTERM (a preemption notice) saves one at the current step and exits 0.
"""

import os
import sys

# gs:// paths through epath's fsspec backend (gcsfs) rather than TensorFlow's gfile, set
# before anything opens one: the same GCS client for config.json, images, events and
# orbax's metadata on a TPU VM as in the emulator tests (tests/gcs_emulator.py), and
# gcsfs's plain filesystem (its experimental one first asks the Storage Control API).
os.environ.setdefault("EPATH_USE_TF", "false")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
from ml_collections import config_flags

from beit_jax import logs
from beit_jax.errors import ConfigError
from beit_jax.trainers import run  # the dispatch; `main.run` for scripts and tests

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Where checkpoints, metrics, images and config.json go (local path or gs://)."
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator",
  None,
  "host:port of process 0, for several processes without a TPU "
  "pod's auto-detection (with --num_processes and --process_id).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_MULTIHOST = flags.DEFINE_bool(
  "multihost",
  False,
  "Call jax.distributed.initialize() with auto-detection (TPU pod slices, SLURM).",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    sys.exit("beit_jax: error: both --config and --workdir are required")
  logs.quiet_libraries()
  import jax  # pylint: disable=g-import-not-at-top

  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _MULTIHOST.value:
    jax.distributed.initialize()
  logging.info(
    "JAX %s: process %d/%d, %d local / %d global devices (%s)",
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )
  from beit_jax.errors import Preempted, TrainingError  # pylint: disable=g-import-not-at-top

  try:
    metrics = run(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, TrainingError) as e:
    sys.exit(f"beit_jax: error: {e}")
  except Preempted as e:  # stopped as asked, its state saved: not an error
    print(f"beit_jax: {e}", file=sys.stderr, flush=True)
    return
  if metrics:
    logging.info("Final metrics: %s", {k: round(v, 4) for k, v in metrics.items()})


if __name__ == "__main__":
  app.run(main)
