"""A beit-jax checkpoint's params, read onto one host device (the optimizer state stays on disk)."""

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from beit_jax.errors import ConfigError
from beit_jax.params import blocks


def find_step_dir(path: str) -> epath.Path:
  """A run's workdir, its checkpoints/ folder, or one step folder -> a step folder."""
  p = epath.Path(path)
  if (p / "state").exists():
    return p
  if (p / "checkpoints").exists():
    p = p / "checkpoints"
  steps = (
    [c for c in p.iterdir() if c.name.isdigit() and (c / "state").exists()] if p.exists() else []
  )
  if not steps:
    raise ConfigError(
      f"no beit-jax checkpoint found at {path} (expected a workdir with "
      "checkpoints/<step>/state, or a step folder)"
    )
  return max(steps, key=lambda c: int(c.name))


def read(path: str) -> Any:
  """The `params` of the latest checkpoint under `path` (host numpy arrays, blocks
  unscanned: `cast` stacks them for a scanned model).

  The optimizer state in that checkpoint is not needed and is not read.
  """
  step_dir = find_step_dir(path)
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(step_dir / "state").item_metadata.tree
    if "params" not in tree:
      raise ConfigError(f"checkpoint {step_dir} holds no 'params' (keys: {list(tree)})")
    # Onto one local device, whatever mesh wrote it (8 TPU cores, fsdp...); only the
    # params are read, the optimizer state (twice their size) stays on disk.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {
      "params": jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree["params"]
      )
    }
    state = ckptr.restore(
      step_dir / "state",
      args=ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
      ),
    )
  return blocks.unstacked(jax.device_get(state["params"]))
