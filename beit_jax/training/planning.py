"""Ahead-of-time plans: compile a run's exact train step for a target, run nothing.

The library behind `python -m beit_jax.plan` (the CLI, its flags and the targets it
takes are described there); flag-free, so tests and notebooks can import it.
"""

import dataclasses
import importlib.metadata
import importlib.util
import os
import re
import sys
import time

from beit_jax.training import hardware
from beit_jax.training import optim
from beit_jax.errors import ConfigError
from beit_jax.training.hardware import DEVICES, Device  # in hardware: runs' MFU reads it too

GIB = 1024**3


# libtpu topology shapes (chips), as MaxText's accelerator_to_spec_map lays them out.
_SHAPES_3D = {
  4: "2x2x1",
  8: "2x2x2",
  16: "2x2x4",
  32: "2x4x4",
  64: "4x4x4",
  128: "4x4x8",
  256: "4x8x8",
  512: "8x8x8",
  1024: "8x8x16",
  2048: "8x16x16",
}
_SHAPES_2D = {
  1: "1x1",
  4: "2x2",
  8: "2x4",
  16: "4x4",
  32: "4x8",
  64: "8x8",
  128: "8x16",
  256: "16x16",
}
_LIBTPU_PREFIX = {"v4": "v4", "v5p": "v5", "v5e": "v5e", "v6e": "v6e"}
_FAMILY_OF_PREFIX = {"v4": "v4", "v5": "v5p", "v5p": "v5p", "v5e": "v5e", "v6e": "v6e"}
ACCEPTED = (
  "v4-N and v5p-N (N TensorCores: 8, 16, 32, ... 4096), v5e-N and v6e-N "
  "(N chips: 1, 4, 8, ... 256), a libtpu name such as v5e:8x8 or v5:4x4x4, or "
  "h100:N, a100:N, a100-40:N, cpu:N (N fake CPU devices)"
)


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # as given
  device: Device
  num_devices: int
  tpu: dict | None = None  # get_topology_desc kwargs of a TPU target


def parse_topology(name: str) -> Target:
  """`--topology` -> Target; a one-line ConfigError naming what is accepted otherwise."""
  bad = ConfigError(f"--topology={name!r} is not a known target; accepted: {ACCEPTED}")
  name = (name or "").strip()
  m = re.fullmatch(r"(h100|a100|a100-40|cpu):([1-9][0-9]*)", name)
  if m:
    n = int(m.group(2))
    device = DEVICES.get(m.group(1)) or Device(
      "CPU", _host_memory_gib() / n, None, "this host's memory shared by N devices"
    )
    return Target(name, device, n)
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-([1-9][0-9]*)", name)
  if m:
    family, n = m.group(1), int(m.group(2))
    three_d = family in ("v4", "v5p")
    if three_d and n % 2:
      raise bad
    chips = n // 2 if three_d else n
    shape = (_SHAPES_3D if three_d else _SHAPES_2D).get(chips)
    if shape is None:
      raise bad
    topo = f"{_LIBTPU_PREFIX[family]}:{shape}"
  else:
    m = re.fullmatch(r"(v4|v5|v5p|v5e|v6e):([1-9][0-9]*(?:x[1-9][0-9]*){1,2})", name)
    if not m:
      raise bad
    family, topo = _FAMILY_OF_PREFIX[m.group(1)], name.replace("v5p:", "v5:")
    dims = [int(d) for d in m.group(2).split("x")]
    three_d = family in ("v4", "v5p")
    if len(dims) != (3 if three_d else 2):
      raise bad
    chips = 1
    for d in dims:
      chips *= d
  dims = [int(d) for d in topo.split(":")[1].split("x")]
  # Wrap-around links as MaxText's layouts have them: 3D slices from 4x4x4 on, 2D along a
  # side of 16 chips.
  wrap = (min(dims) >= 4,) * 3 if three_d else (dims[0] >= 16, dims[1] >= 16, False)
  tpu = dict(
    topology_name=topo,
    chip_config_name="megacore" if three_d else "default",
    chips_per_host_bounds=(1, 1, 1) if chips == 1 else (2, 2, 1),
    num_slices=1,
    wrap=wrap,
  )
  return Target(name, DEVICES[family], chips, tpu)


def _host_memory_gib() -> float:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def libtpu_version() -> str | None:
  if importlib.util.find_spec("libtpu") is None:
    return None
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return "unknown version"


def tpu_devices(target: Target) -> list:
  """The compile-only devices of a TPU target (needs libtpu; no TPU needed)."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    devices = topologies.get_topology_desc(platform="tpu", **target.tpu).devices
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(
      f"--topology={target.name}: libtpu cannot describe {target.tpu['topology_name']}: {first}"
    ) from None
  if len(devices) != target.num_devices:
    raise ConfigError(
      f"--topology={target.name}: libtpu gave {len(devices)} devices for "
      f"{target.tpu['topology_name']}, expected {target.num_devices}"
    )
  return list(devices)


# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Plan:
  target: Target
  compiler: str  # who compiled, e.g. "TPU compiler (libtpu 0.0.42.1)"
  stand_in: bool  # fake CPU devices stood in for the target's
  mesh: dict
  data_parallel: int  # batch shards (tensor devices share one)
  batch_size: int
  epoch_size: int | None  # the schedule's epoch when input.dataset was replaced
  dataset: str
  model: str
  compile_seconds: float
  params_bytes: int  # per device, from the state's shardings
  opt_state_bytes: int
  frozen_bytes: int
  batch_bytes: int
  argument_bytes: int  # XLA memory analysis, per device
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float  # XLA cost analysis, per device per step
  model_flops: float  # the ViT's forward + backward matmuls and attention, per device
  memory_bytes: int  # the device's
  peak_flops: float | None  # per device
  # The compiler's own refusal (e.g. TPU's "Ran out of memory in memory space hbm"): then
  # XLA gave no memory or cost analysis, and the plan does not fit.
  compiler_refusal: str = ""
  accum_steps: int = 1  # micro-batches per step (optim.accum_steps)
  # With accum_steps > 1: the same step without accumulation (the whole batch at once).
  unaccumulated: "Plan | None" = None

  @property
  def total_bytes(self) -> int:
    return (
      self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
    )

  @property
  def fits(self) -> bool:
    return not self.compiler_refusal and self.total_bytes <= self.memory_bytes

  @property
  def step_seconds(self) -> float | None:
    return self.flops / self.peak_flops if self.peak_flops else None


def _local_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  return int(
    sum(
      int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
      for x in jax.tree.leaves(tree)
    )
  )


def vit_train_flops(config, batch_per_device: int) -> float:
  """The ViT's training FLOPs per device and step: 3x (forward + backward) its matmuls
  (patch embedding, qkv, projection, MLP, the MIM head on the masked positions) and
  attention; the tokenizer, norms and elementwise work are not counted (PaLM's MFU)."""
  from beit_jax.training import mim_objective  # pylint: disable=g-import-not-at-top
  from beit_jax.models import vit  # pylint: disable=g-import-not-at-top

  size = vit.size_kwargs(config.model)
  d, depth, patch = size["width"], size["depth"], size["patch_size"]
  n = (config.input.image_size // patch) ** 2
  masked = mim_objective.max_masked(config)
  forward = (
    2 * n * patch * patch * 3 * d
    + depth * hardware.block_forward_flops(size, n + 1)
    + 2 * masked * d * config.tokenizer.vocab_size
  )
  return 3.0 * forward * batch_per_device


def _batch_structs(config, batch_size: int, mesh) -> dict:
  """The MIM step's batch (what data.pretrain yields) as sharded ShapeDtypeStructs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from beit_jax.training import sharding  # pylint: disable=g-import-not-at-top
  from beit_jax import tokenizers  # pylint: disable=g-import-not-at-top

  spec = sharding.batch_sharding(mesh)
  out = {}
  for name, view in tokenizers.pretrain_views(config).items():
    out[name] = jax.ShapeDtypeStruct(
      (batch_size, view.size, view.size, 3), jnp.float32, sharding=spec
    )
  grid = config.input.image_size // config.input.patch_size
  out["mask"] = jax.ShapeDtypeStruct((batch_size, grid * grid), jnp.bool_, sharding=spec)
  return out


def make_plan(
  config,
  target: Target,
  devices: list,
  *,
  compiler: str,
  stand_in: bool,
  epoch_size: int = 1281167,
  memory_gib: float | None = None,
  peak_tflops: float | None = None,
  compare_accumulation: bool = True,
) -> Plan:
  """Compiles `config`'s train step for `devices` (nothing allocated, nothing run); with
  `optim.accum_steps` > 1 (and `compare_accumulation`) the step without accumulation too,
  for the memory accumulation saves."""
  import jax  # pylint: disable=g-import-not-at-top
  from beit_jax.training import runner  # pylint: disable=g-import-not-at-top
  from beit_jax.training import sharding  # pylint: disable=g-import-not-at-top
  from beit_jax import tokenizers  # pylint: disable=g-import-not-at-top
  from beit_jax import trainers  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  if config.get("trainer") != "mim":
    raise ConfigError(
      f"trainer={config.get('trainer')!r}: plans are made for MIM "
      "pretraining configs (trainer='mim') only"
    )
  dataset = config.input.dataset
  replaced = None
  if dataset != "embedded":
    config.input.dataset = "embedded"
    config.input.embedded_epoch_size = replaced = epoch_size
  trainers.validate_config(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_size(config.input.batch_size, mesh, accum_steps=optim.accum_steps(config))
  sharding.check_tensor_split(config.model, config.mesh)

  tokenizer = tokenizers.build(config.tokenizer)
  image_size = tokenizers.view(config).size
  tok_params = jax.eval_shape(lambda k: tokenizer.init(k, image_size), jax.random.key(0))
  task = trainers.make_task(config, frozen={"tokenizer": (tokenizer, tok_params)})
  built = runner.abstract_setup(config, task, mesh)
  batch = _batch_structs(config, config.input.batch_size, mesh)

  data_parallel = sharding.data_parallel_size(mesh)
  peak = peak_tflops if peak_tflops is not None else target.device.peak_tflops
  known = dict(
    target=target,
    compiler=compiler,
    stand_in=stand_in,
    mesh=dict(mesh.shape),
    data_parallel=data_parallel,
    batch_size=config.input.batch_size,
    epoch_size=replaced,
    dataset=dataset,
    model=config.model.variant,
    params_bytes=_local_bytes(built.state.params),
    opt_state_bytes=_local_bytes(built.state.opt_state),
    frozen_bytes=_local_bytes(built.frozen),
    batch_bytes=_local_bytes(batch),
    # per device: its batch shard's, split over the devices that share the shard
    model_flops=vit_train_flops(config, config.input.batch_size // data_parallel)
    / sharding.model_parallel_size(mesh),
    memory_bytes=int((memory_gib if memory_gib is not None else target.device.memory_gib) * GIB),
    peak_flops=peak * 1e12 if peak else None,
  )
  t0 = time.perf_counter()
  try:
    compiled = built.step.lower(built.state, batch, built.frozen).compile()
  except Exception as e:  # pylint: disable=broad-except
    refusal = re.search(r"RESOURCE_EXHAUSTED: ([^\n]*)", str(e))
    if refusal is None:
      raise
    return Plan(
      **known,
      compile_seconds=time.perf_counter() - t0,
      argument_bytes=0,
      output_bytes=0,
      alias_bytes=0,
      temp_bytes=0,
      code_bytes=0,
      flops=0.0,
      compiler_refusal=refusal.group(1).strip(),
    )
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  accum_steps = optim.accum_steps(config)
  unaccumulated = None
  if accum_steps > 1 and compare_accumulation:
    whole = config.copy_and_resolve_references()
    whole.optim.accum_steps = 1
    unaccumulated = make_plan(
      whole,
      target,
      devices,
      compiler=compiler,
      stand_in=stand_in,
      epoch_size=epoch_size,
      memory_gib=memory_gib,
      peak_tflops=peak_tflops,
      compare_accumulation=False,
    )
  return Plan(
    **known,
    compile_seconds=seconds,
    accum_steps=accum_steps,
    unaccumulated=unaccumulated,
    argument_bytes=int(mem.argument_size_in_bytes),
    output_bytes=int(mem.output_size_in_bytes),
    alias_bytes=int(mem.alias_size_in_bytes),
    temp_bytes=int(mem.temp_size_in_bytes),
    code_bytes=int(mem.generated_code_size_in_bytes),
    flops=hardware.step_flops(compiled, config, batch),
  )


def _gib(n: float) -> str:
  return f"{n / GIB:8.2f} GiB" if abs(n) >= GIB / 10 else f"{n / 2**20:8.2f} MiB"


def format_plan(p: Plan, config_name: str = "") -> str:
  t = p.target
  lines = [
    f"plan: {config_name or p.model} on {t.name}: {t.num_devices} x {t.device.kind}"
    + (f" (libtpu topology {t.tpu['topology_name']})" if t.tpu else ""),
    f"  compiled by: {p.compiler}",
  ]
  if p.stand_in:
    lines.append(
      f"  STAND-IN: {t.num_devices} fake CPU devices compiled this program; "
      f"memory and FLOPs are XLA:CPU's analysis, not {t.device.kind}'s compiler's"
    )
  shard = p.batch_size // p.data_parallel
  micro = (
    f", in {p.accum_steps} micro-batches of {shard // p.accum_steps}" if p.accum_steps > 1 else ""
  )
  lines += [
    f"  model {p.model}, global batch {p.batch_size} "
    f"({shard} per data-parallel shard{micro}), "
    f"mesh {p.mesh}, compile {p.compile_seconds:.1f} s"
  ]
  if p.epoch_size is not None:
    lines.append(
      f"  data: none read; input.dataset={p.dataset} replaced by 'embedded' with "
      f"input.embedded_epoch_size={p.epoch_size} (sets the schedule only)"
    )
  lines += [
    "per device memory:",
    f"  parameters        {_gib(p.params_bytes)}   (from the state's shardings)",
    f"  optimizer state   {_gib(p.opt_state_bytes)}",
    f"  tokenizer params  {_gib(p.frozen_bytes)}   (frozen input)",
    f"  batch             {_gib(p.batch_bytes)}",
  ]
  if p.compiler_refusal:
    return "\n".join(
      lines + [f"verdict: does not fit (the compiler refused it: {p.compiler_refusal})"]
    )
  lines += [
    f"  arguments         {_gib(p.argument_bytes)}   (XLA memory analysis from here on)",
    f"  outputs           {_gib(p.output_bytes)}",
    f"  aliased (donated) {_gib(p.alias_bytes)}",
    f"  temporaries       {_gib(p.temp_bytes)}",
    f"  program code      {_gib(p.code_bytes)}",
    f"  total = arguments + outputs - aliased + temporaries + code: {_gib(p.total_bytes)} "
    f"({p.total_bytes} bytes) of {_gib(p.memory_bytes).strip()} ({p.memory_bytes} bytes, "
    f"{t.device.kind})",
  ]
  u = p.unaccumulated
  if u is not None:
    lines.append(
      f"  without accumulation (optim.accum_steps=1): total {_gib(u.total_bytes).strip()}, "
      f"temporaries {_gib(u.temp_bytes).strip()}"
      if not u.compiler_refusal
      else f"  without accumulation (optim.accum_steps=1): does not fit ({u.compiler_refusal})"
    )
  lines += [
    "compute per device and step:",
    f"  FLOPs (XLA cost analysis)  {p.flops:.4g}",
    f"  model FLOPs (ViT fwd+bwd)  {p.model_flops:.4g}",
  ]
  if p.step_seconds:
    mfu = p.model_flops / (p.step_seconds * p.peak_flops)
    lines += [
      f"  at the peak {p.peak_flops / 1e12:g} TFLOP/s: step {p.step_seconds * 1e3:.1f} "
      f"ms, {p.batch_size / p.step_seconds:.0f} images/s, MFU {100 * mfu:.1f}% "
      "(a lower bound on the step time: no communication or memory stalls)"
    ]
  else:
    lines.append("  no peak FLOP/s known for this device: pass --peak_tflops for a step time")
  headroom = p.memory_bytes - p.total_bytes
  lines.append(
    f"verdict: {'fits' if p.fits else 'does not fit'} "
    f"({_gib(abs(headroom)).strip()} {'free' if p.fits else 'over'})"
  )
  return "\n".join(lines)


def _force_cpu_devices(n: int) -> None:
  """Fake CPU devices, set before jax starts its backends."""
  flags_now = re.sub(
    r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
  )
  os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={n}".strip()


def run(
  config,
  topology: str,
  *,
  batch: int | None = None,
  accum_steps: int | None = None,
  epoch_size: int = 1281167,
  memory_gib: float | None = None,
  peak_tflops: float | None = None,
  fake_devices: bool = False,
  config_name: str = "",
) -> Plan:
  """Parses `topology`, finds its devices (libtpu's, or fake CPU ones), plans, prints."""
  target = parse_topology(topology)
  if batch:
    config.input.batch_size = batch
  if accum_steps:
    config.optim.accum_steps = accum_steps
  version = libtpu_version()
  use_tpu = target.tpu is not None and version is not None and not fake_devices
  if "jax" not in sys.modules:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a plan never runs on this host's devices
    if not use_tpu:
      _force_cpu_devices(target.num_devices)
  import jax  # pylint: disable=g-import-not-at-top

  if use_tpu:
    devices = tpu_devices(target)
    compiler = f"the TPU compiler of libtpu {version}, on this host (no TPU needed)"
  else:
    devices = jax.devices("cpu")
    if len(devices) < target.num_devices:
      raise ConfigError(
        f"--topology={topology} needs {target.num_devices} fake CPU devices, "
        f"this process has {len(devices)} (jax started before the plan)"
      )
    devices = devices[: target.num_devices]
    compiler = "XLA:CPU" + (
      ""
      if target.tpu is None
      else " (libtpu is not installed: pip install -r requirements-tpu.txt)"
      if version is None
      else " (--fake_devices)"
    )
  plan = make_plan(
    config,
    target,
    devices,
    compiler=compiler,
    stand_in=not use_tpu and target.device.kind != "CPU",
    epoch_size=epoch_size,
    memory_gib=memory_gib,
    peak_tflops=peak_tflops,
  )
  print(format_plan(plan, config_name), flush=True)
  return plan
