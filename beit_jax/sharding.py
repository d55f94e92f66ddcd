"""Device mesh from the config, parameter sharding rules, host batches -> global arrays.

The mesh has two axes: `data` (pure data parallelism: parameters replicated) and
`fsdp` (data parallelism whose parameters and optimizer state are sharded, ZeRO-3
style: XLA inserts the all-gathers). The batch is split over both. On a TPU pod slice
`mesh = {'data': -1, 'fsdp': 1}` is plain data parallelism; ViT-L/H may want
`{'data': -1, 'fsdp': 8}`.
"""
import re
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from beit_jax import block_layout
from beit_jax.errors import ConfigError
from beit_jax.param_paths import path_str

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg: ml_collections.ConfigDict | dict,
              devices: list | None = None) -> Mesh:
  """A Mesh with axes (data, fsdp); one size may be -1 (= the remaining devices)."""
  devices = jax.devices() if devices is None else devices
  sizes = {a: int(dict(mesh_cfg).get(a, 1)) for a in AXES}
  unknown = set(dict(mesh_cfg)) - set(AXES)
  if unknown:
    raise ConfigError(f"mesh: unknown axes {sorted(unknown)}; accepted: {list(AXES)}")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1, got {sizes}")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ConfigError(f"mesh: axis sizes must be positive or -1, got {sizes}")
  if free:
    if len(devices) % fixed:
      raise ConfigError(f"mesh: {len(devices)} devices are not divisible by the fixed "
                        f"axes {sizes}")
    sizes[free[0]] = len(devices) // fixed
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ConfigError(f"mesh: {sizes} needs {int(np.prod(list(sizes.values())))} devices, "
                      f"this run has {len(devices)}")
  grid = np.asarray(devices).reshape([sizes[a] for a in AXES])
  return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every data-parallel axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, field: str = "input.batch_size"):
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % n or global_batch % jax.process_count():
    raise ConfigError(f"{field}={global_batch} must be divisible by the {n} data-parallel "
                      f"devices and {jax.process_count()} processes")


def _fsdp_spec(shape: tuple[int, ...], n: int) -> P:
  """Shards the largest dimension divisible by n over `fsdp` (else replicates)."""
  if n == 1:
    return P()
  for dim in np.argsort(shape)[::-1]:
    if shape[dim] % n == 0 and shape[dim] >= n:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(abstract_tree: Any, mesh: Mesh,
                    rules: tuple[tuple[str, str], ...] = ((".*", "fsdp"),)) -> Any:
  """NamedShardings for a tree of arrays, by the first regex rule matching its path.

  A rule's action is "fsdp" (largest divisible dim over the fsdp axis) or
  "replicate". Trees are matched on '/'-joined key paths, e.g.
  'opt_state/0/mu/blocks_3/mlp/fc1/kernel'.
  """
  def spec(path, leaf):
    name = path_str(path)
    for pattern, action in rules:
      if re.search(pattern, name):
        if action == "replicate":
          return NamedSharding(mesh, P())
        if action == "fsdp":
          n = mesh.shape["fsdp"]
          if block_layout.STACKED_PATH.search(name):  # scanned: keep the layer axis whole
            return NamedSharding(mesh, P(None, *_fsdp_spec(tuple(leaf.shape[1:]), n)))
          return NamedSharding(mesh, _fsdp_spec(tuple(leaf.shape), n))
        raise ConfigError(f"sharding rule {pattern!r}: unknown action {action!r}; "
                          "accepted: 'fsdp', 'replicate'")
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(spec, abstract_tree)


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of the batch -> global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
