r"""Ahead-of-time plan of a run: compile its exact train step for a target, run nothing.

  python -m beit_jax.plan --config=configs/beit_base.py --topology=v5e-64
  python -m beit_jax.plan --config=configs/beit_large.py --topology=v4-32 --batch=2048

Prints, per device: parameter and optimizer-state bytes (from the state's shardings), the
compiled program's arguments, outputs, donated (aliased) bytes and temporaries (XLA's memory
analysis), their total against the device's memory (fits or not), the step's FLOPs (XLA's
cost analysis) and the step time and MFU at the device's peak FLOP/s. With gradient
accumulation (`optim.accum_steps` > 1, or `--accum_steps`) it also compiles the step without
it and prints that step's total memory beside it.

Targets (`--topology`):
  v4-N, v5p-N      N TensorCores (N/2 chips, one megacore device per chip), e.g. v4-32, v5p-128
  v5e-N, v6e-N     N chips, e.g. v5e-64
  v5e:8x8, v4:2x2x4, v5:4x4x4   a libtpu topology name as such
  h100:N, a100:N, a100-40:N, cpu:N   N fake CPU devices judged against that device's table
                   entry (a GPU-count stand-in: XLA:CPU compiles it, not XLA:GPU)

With `libtpu` installed (requirements-tpu.txt) TPU targets are compiled by the TPU compiler
on this host (`jax.experimental.topologies.get_topology_desc`, `TPU_SKIP_MDS_QUERY=1`), so
the figures are the TPU's. Without it, fake CPU devices of the same count stand in and the
output says so: the program is the same, XLA:CPU's memory and cost figures are not a TPU's.

A plan reads no data: `input.dataset` is replaced by 'embedded' with an epoch of
`--epoch_size` examples (ImageNet-1K's 1281167 by default), which sets the schedule's step
counts only. The tokenizer's params are shapes (`jax.eval_shape` of its init).
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from beit_jax.training import planning
from beit_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_TOPOLOGY = flags.DEFINE_string(
  "topology",
  None,
  "Target, e.g. v5e-64, v4-32, v5p-128, v5e:8x8, h100:8, cpu:8 (see the module doc).",
)
_BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: the config's).")
_ACCUM = flags.DEFINE_integer(
  "accum_steps",
  None,
  "Micro-batches per step (default: the "
  "config's optim.accum_steps); > 1 also plans the step without.",
)
_EPOCH_SIZE = flags.DEFINE_integer(
  "epoch_size", 1281167, "Examples per epoch for the schedule (ImageNet-1K train)."
)
_MEMORY = flags.DEFINE_float(
  "device_memory_gib", None, "Override the device's memory (GiB) the verdict is judged on."
)
_PEAK = flags.DEFINE_float("peak_tflops", None, "Override the device's peak TFLOP/s.")
_FAKE = flags.DEFINE_bool(
  "fake_devices", False, "Use fake CPU devices even when libtpu is installed."
)


def main(argv):
  del argv
  if not _TOPOLOGY.value or _CONFIG.value is None:
    sys.exit("beit_jax: error: both --config and --topology are required")
  try:
    planning.run(
      _CONFIG.value,
      _TOPOLOGY.value,
      batch=_BATCH.value,
      accum_steps=_ACCUM.value,
      epoch_size=_EPOCH_SIZE.value,
      memory_gib=_MEMORY.value,
      peak_tflops=_PEAK.value,
      fake_devices=_FAKE.value,
      config_name=config_flags.get_config_filename(flags.FLAGS["config"]),
    )
  except ConfigError as e:
    sys.exit(f"beit_jax: error: {e}")


if __name__ == "__main__":
  app.run(main)
