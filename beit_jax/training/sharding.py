"""Device mesh from the config, parameter shardings by logical axes, host batches -> arrays.

The mesh has four axes (AXES), outermost first:
  slice   data parallelism over the data-center network: TPU slices, or GPU nodes
  data    data parallelism, parameters replicated
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style;
          XLA inserts the all-gathers)
  tensor  tensor parallelism: attention heads, MLP hidden units and the vocabulary split
          over devices (Megatron-style: qkv and fc1 by columns, proj and fc2 by rows)
The batch is split over slice, data and fsdp (BATCH_AXES); `tensor` devices share a batch
shard. A new mesh axis is named here (AXES, and BATCH_AXES if the batch is split over it)
and given a size and the logical names it takes in configs/common.py (`mesh_config`,
`sharding_config`'s rules); nothing else lists the axes.

Each model module names the axes of its weights by role (its `PARAM_AXES`, e.g.
`vit.PARAM_AXES`: embed, heads, mlp, vocab, ...; see `param_paths`), which the caller of
`param_shardings` passes, and the ViT those of its activations at block boundaries
(`nn.with_logical_constraint`); `config.sharding.rules` (configs/common.py) maps those
logical names onto mesh axes. So plain data parallelism, FSDP, FSDP + tensor and
multi-slice are config changes only:
  mesh = dict(data=-1)                      # data parallel
  mesh = dict(data=-1, fsdp=8)              # ViT-L/H: FSDP inside groups of 8
  mesh = dict(data=-1, fsdp=4, tensor=2)    # + heads and MLP split in two
  mesh = dict(slice=2, data=-1, fsdp=8)     # two TPU slices (or GPU nodes)
Weights without a role (the dVAE's and segmentation heads' convolutions) shard their
largest divisible dimension over `fsdp`; weights smaller than `sharding.min_size`
elements (biases, norms, position tables) stay whole on every device. A scanned ViT's
stacked blocks keep their layer axis whole (`blocks.stacked_mask`).
"""

import contextlib
import functools
import re
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from beit_jax.params import blocks
from beit_jax.training import validate
from beit_jax.errors import ConfigError
from beit_jax.models import vit
from beit_jax.models.paths import AxesTable, path_str

AXES = ("slice", "data", "fsdp", "tensor")
BATCH_AXES = ("slice", "data", "fsdp")


def _rules(cfg: ml_collections.ConfigDict | dict) -> tuple:
  """`config.sharding.rules` as flax logical axis rules (tuples: JSON gives back lists).

  For each dimension the first rule of its name whose mesh axes are still free (and, for
  weights, divide it) applies: 'embed' of activations finds fsdp taken by 'batch' and
  stays whole.
  """

  def axes(a):
    return tuple(a) if isinstance(a, (list, tuple)) else a

  rules = tuple((str(name), axes(a)) for name, a in dict(cfg)["rules"])
  for name, a in rules:
    bad = [x for x in (a if isinstance(a, tuple) else (a,)) if x is not None and x not in AXES]
    if bad:
      raise ConfigError(
        f"sharding.rules: {name!r} maps to unknown mesh axes {bad}; the mesh axes are {list(AXES)}"
      )
  return rules


def _sizes(mesh_cfg: ml_collections.ConfigDict | dict) -> dict[str, int]:
  """{axis: size} of `config.mesh`, absent axes 1, checked as far as no device is needed."""
  unknown = set(dict(mesh_cfg)) - set(AXES)
  if unknown:
    raise ConfigError(f"mesh: unknown axes {sorted(unknown)}; accepted: {list(AXES)}")
  sizes = {a: int(dict(mesh_cfg).get(a, 1)) for a in AXES}
  if len([a for a, s in sizes.items() if s == -1]) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1, got {sizes}")
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ConfigError(f"mesh: axis sizes must be positive or -1, got {sizes}")
  return sizes


def _check_mesh(config: ml_collections.ConfigDict) -> None:
  if "mesh" in config:
    _sizes(config.mesh)


def _is_regex(v) -> bool:
  if not isinstance(v, str):
    return False
  try:
    re.compile(v)
  except re.error:
    return False
  return True


# The start-up rules of `config.mesh` and `config.sharding` (`trainers.validate_config`);
# what needs the devices (their count, the batch's split) is checked with the mesh.
RULES = (
  *(
    (
      f"mesh.{axis}",
      lambda v: validate.number(integer=True)(v) and (v == -1 or v >= 1),
      "an integer >= 1, or -1 (the devices the other axes leave; one axis at most)",
    )
    for axis in AXES
  ),
  (
    "sharding.rules",
    validate.accepted_by(lambda v: _rules({"rules": v})),
    f"(logical axis, mesh axes) pairs, the mesh axes None, one of {AXES} or a tuple of them",
  ),
  ("sharding.min_size", validate.number(0, integer=True), "an integer >= 0"),
  (
    "sharding.replicate",
    lambda v: isinstance(v, (tuple, list)) and all(_is_regex(r) for r in v),
    "a tuple of regular expressions of parameter paths, e.g. ('lm_head',)",
  ),
)
CHECKS = (_check_mesh,)


# --------------------------------------------------------------------------------- mesh


def _granules(devices: list, n: int) -> list[list]:
  """`devices` in `n` equal groups joined by the slow network: TPU slices, else processes.

  On one process without slices (fake CPU devices, a single GPU host) the groups are
  consecutive devices: a simulation of n slices.
  """
  key = (
    (lambda d: d.slice_index) if hasattr(devices[0], "slice_index") else (lambda d: d.process_index)
  )
  devices = sorted(devices, key=lambda d: (key(d), d.id))
  size = len(devices) // n
  groups = [devices[i * size : (i + 1) * size] for i in range(n)]
  owners = [{key(d) for d in g} for g in groups]
  granules = set().union(*owners)
  # One granule: the simulation above; several: none may be split between two groups.
  if len(granules) > 1 and sum(map(len, owners)) != len(granules):
    what = "TPU slices" if hasattr(devices[0], "slice_index") else "processes"
    raise ConfigError(
      f"mesh.slice={n}: the {len(devices)} devices are in "
      f"{len(granules)} {what}, which do not split into {n} equal groups"
    )
  return groups


def _ici_grid(shape: tuple[int, ...], devices: list) -> np.ndarray:
  """Devices of one slice laid out on `shape`, following the TPU torus where it can."""
  try:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError) as e:
    logging.warning("mesh %s: no topology-aware layout (%s); devices in id order", shape, e)
    return np.asarray(devices).reshape(shape)


def make_mesh(mesh_cfg: ml_collections.ConfigDict | dict, devices: list | None = None) -> Mesh:
  """The Mesh of `config.mesh` (axes AXES, absent ones of size 1; one size may be -1)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = _sizes(mesh_cfg)
  free = [a for a, s in sizes.items() if s == -1]
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if free:
    if len(devices) % fixed:
      raise ConfigError(f"mesh: {len(devices)} devices are not divisible by the fixed axes {sizes}")
    sizes[free[0]] = len(devices) // fixed
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ConfigError(
      f"mesh: {sizes} needs {int(np.prod(list(sizes.values())))} devices, "
      f"this run has {len(devices)}"
    )
  ici = tuple(sizes[a] for a in AXES[1:])
  grid = np.stack([_ici_grid(ici, g) for g in _granules(devices, sizes["slice"])])
  return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every data-parallel axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  """How many shards the batch is split into (tensor devices share one)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def model_parallel_size(mesh) -> int:
  """How many devices share one batch shard and split its work (the non-batch axes)."""
  return int(np.prod([n for a, n in dict(mesh.shape).items() if a not in BATCH_AXES]))


def check_batch_size(
  global_batch: int, mesh: Mesh, field: str = "input.batch_size", accum_steps: int = 1
):
  """Every data-parallel device and process gets an equal share of the batch, and with
  `accum_steps` > 1 each device's share splits into that many micro-batches."""
  n = data_parallel_size(mesh)
  if global_batch % (n * accum_steps) or global_batch % jax.process_count():
    times = f" times optim.accum_steps={accum_steps}" if accum_steps > 1 else ""
    raise ConfigError(
      f"{field}={global_batch} must be divisible by the {n} data-parallel "
      f"devices{times} and {jax.process_count()} processes"
    )


def check_tensor_split(model_cfg: ml_collections.ConfigDict, mesh_cfg) -> None:
  """Heads and MLP units must split evenly over `tensor` (else XLA pads every block)."""
  t = int(dict(mesh_cfg).get("tensor", 1))
  if t <= 1:
    return
  sizes = vit.size_kwargs(model_cfg)
  for field in ("num_heads", "mlp_dim"):
    if sizes[field] % t:
      raise ConfigError(
        f"mesh.tensor={t} must divide model.{field}={sizes[field]} "
        f"(model.variant={model_cfg.variant!r})"
      )


# ---------------------------------------------------------------------------- parameters


@functools.cache
def _path_end(pattern: str) -> re.Pattern:
  return re.compile(rf"(^|/)(?:{pattern})$")


def _logical_axes(name: str, ndim: int, param_axes: AxesTable) -> tuple[str | None, ...] | None:
  """The role-given logical axes of the weight at path `name`, or None (no role): those of
  the first entry of the model's table whose pattern ends the path and has `ndim` axes."""
  for pattern, axes in param_axes:
    if len(axes) == ndim and _path_end(pattern).search(name):
      return axes
  return None


def _spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> P:
  """Per dimension the first rule of its name whose mesh axes are free and divide it."""
  used, spec = set(), []
  for name, dim in zip(logical, shape):
    chosen = None
    for rule_name, axes in rules:
      if rule_name != name or axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      n = int(np.prod([mesh.shape[a] for a in axes]))
      if used.isdisjoint(axes) and dim % n == 0:
        chosen = axes if len(axes) > 1 else axes[0]
        used.update(axes)
        break
    spec.append(chosen)
  return P(*spec)


def _fsdp_spec(shape: Sequence[int], n: int) -> P:
  """The largest dimension divisible by n over `fsdp` (else whole): weights without a role."""
  if n == 1:
    return P()
  for dim in np.argsort(shape)[::-1]:
    if shape[dim] % n == 0 and shape[dim] >= n:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(
  abstract_tree: Any, mesh: Mesh, cfg: ml_collections.ConfigDict | dict, param_axes: AxesTable
) -> Any:
  """NamedShardings for a tree of arrays (params, optimizer state, a whole train state).

  `param_axes`: the model's PARAM_AXES (e.g. `vit.PARAM_AXES`; () for a model whose weights
  have no roles), matched on '/'-joined paths, e.g. 'opt_state/0/mu/blocks_3/mlp/fc1/kernel';
  a scanned model's stacked blocks keep their leading layer axis whole.
  """
  rules, min_size = _rules(cfg), int(cfg["min_size"])
  keep = [re.compile(r) for r in cfg["replicate"]]

  def spec(path, leaf, stacked):
    name = path_str(path)
    shape = tuple(leaf.shape)
    stacked = stacked and len(shape) > 0
    if stacked:
      shape = shape[1:]
    if int(np.prod(shape)) < max(min_size, 1) or any(r.search(name) for r in keep):
      return NamedSharding(mesh, P())
    logical = _logical_axes(name, len(shape), param_axes)
    s = (
      _fsdp_spec(shape, mesh.shape["fsdp"])
      if logical is None
      else _spec(logical, shape, mesh, rules)
    )
    return NamedSharding(mesh, P(None, *s) if stacked else s)

  return jax.tree_util.tree_map_with_path(spec, abstract_tree, blocks.stacked_mask(abstract_tree))


# --------------------------------------------------------------------------- activations


@contextlib.contextmanager
def activation_rules(mesh: Mesh, cfg: ml_collections.ConfigDict | dict) -> Iterator:
  """While a step is traced: the models' `nn.with_logical_constraint`s take effect.

  Outside it (model.apply in a test, a converter) they are no-ops.
  """
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(_rules(cfg)):
    yield


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of the batch -> global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
  )
