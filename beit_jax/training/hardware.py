"""What the devices can do: the peak FLOP/s of known accelerators, a measured matmul ceiling
for the others (CPU), and XLA's FLOP count of a compiled program.

One place for the ahead-of-time plans (`planning`), the benchmark and the MFU a run logs
(`runner`), so that all three count and divide the same way.
"""

import dataclasses
import functools
import re
import time


@dataclasses.dataclass(frozen=True)
class Device:
  kind: str
  memory_gib: float  # per JAX device
  peak_tflops: float | None  # bf16 dense, per JAX device
  source: str


# Per JAX device (for v4/v5p one megacore chip). Peak: dense bf16 matmul.
DEVICES = {
  # cloud.google.com/tpu/docs/v4: 32 GiB HBM2 and 275 TFLOP/s (bf16) per chip
  "v4": Device("TPU v4", 32, 275, "Cloud TPU v4 docs"),
  # cloud.google.com/tpu/docs/v5e: 16 GiB HBM2 and 197 TFLOP/s (bf16) per chip
  "v5e": Device("TPU v5e", 16, 197, "Cloud TPU v5e docs"),
  # cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e and 459 TFLOP/s (bf16) per chip
  "v5p": Device("TPU v5p", 95, 459, "Cloud TPU v5p docs"),
  # cloud.google.com/tpu/docs/v6e: 32 GiB HBM and 918 TFLOP/s (bf16) per chip
  "v6e": Device("TPU v6e", 32, 918, "Cloud TPU v6e docs"),
  # NVIDIA H100 datasheet (SXM): 80 GB HBM3, 989 TFLOP/s bf16 dense (1979 is with sparsity)
  "h100": Device("NVIDIA H100 SXM 80GB", 80, 989, "NVIDIA H100 datasheet"),
  # NVIDIA H200 datasheet (SXM): 141 GB HBM3e, 989 TFLOP/s bf16 dense, as the H100 SXM
  "h200": Device("NVIDIA H200 SXM 141GB", 141, 989, "NVIDIA H200 datasheet"),
  # NVIDIA A100 datasheet: 40 or 80 GB HBM2e, 312 TFLOP/s bf16 dense
  "a100": Device("NVIDIA A100 80GB", 80, 312, "NVIDIA A100 datasheet"),
  "a100-40": Device("NVIDIA A100 40GB", 40, 312, "NVIDIA A100 datasheet"),
}
# `jax.Device.device_kind` -> DEVICES key. TPU names as XLA's PjRt reports them (v5e and v6e
# are the "lite" chips); the A100's bf16 peak is the same in its SXM and PCIe forms, the
# H100 PCIe's is not the SXM's (left out).
_KINDS = {
  "TPU v4": "v4",
  "TPU v5 lite": "v5e",
  "TPU v5e": "v5e",
  "TPU v5": "v5p",
  "TPU v5p": "v5p",
  "TPU v6 lite": "v6e",
  "TPU v6e": "v6e",
  "NVIDIA H100 80GB HBM3": "h100",
  "NVIDIA H200": "h200",
  "NVIDIA A100-SXM4-80GB": "a100",
  "NVIDIA A100 80GB PCIe": "a100",
  "NVIDIA A100-SXM4-40GB": "a100-40",
  "NVIDIA A100-PCIE-40GB": "a100-40",
}


def known_device(device_kind: str) -> Device | None:
  """The DEVICES entry of a `jax.Device.device_kind`, None for a kind not in the table."""
  key = _KINDS.get(device_kind)
  return DEVICES[key] if key else None


def xla_flops(compiled) -> float:
  """XLA's FLOP count of one call of a compiled program, per device (the partitioned
  program each device runs), plus the cuDNN fused attention calls it counts as none."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  try:
    text = compiled.as_text()
  except Exception:  # pylint: disable=broad-except
    return flops
  return flops + fused_attention_flops(text or "")


_FMHA_CALL = re.compile(r'custom_call_target="__cudnn\$fmha\w*"')
_FMHA_Q = re.compile(r"custom-call\((?:bf16|f16|f8\w*)\[(\d+),(\d+),(\d+),(\d+)\]")


def fused_attention_flops(hlo_text: str) -> float:
  """FLOPs of the cuDNN fused attention calls (`__cudnn$fmha*` custom calls) in a compiled
  program's HLO text, which XLA's cost analysis leaves out: per call of a [B, T, H, hd]
  query (BTNH, the first operand), forward 4 B H T^2 hd (q k^T and p v), backward twice
  that. Like XLA's count, a call inside a loop body counts once."""
  flops = 0.0
  for line in hlo_text.splitlines():
    if not _FMHA_CALL.search(line):
      continue
    shape = _FMHA_Q.search(line)
    if shape is None:
      continue
    b, t, h, hd = map(int, shape.groups())
    flops += (8.0 if 'Backward"' in line else 4.0) * b * h * t * t * hd
  return flops


def matmul_ceiling(size: int, dtype, repeats: int = 5) -> float:
  """Achieved FLOP/s of a [size, size] @ [size, size] matmul on the default device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  a = jnp.ones((size, size), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(repeats):
    out = f(a)
  out.block_until_ready()
  return 2 * size**3 * repeats / (time.perf_counter() - t)


def block_forward_flops(size: dict, tokens: int) -> float:
  """One block's forward matmuls (qkv, projection, MLP) and attention, per image."""
  d, mlp = size["width"], size["mlp_dim"]
  return 2 * tokens * (4 * d * d + 2 * d * mlp) + 4 * tokens * tokens * d


def step_flops(compiled, config, batch) -> float:
  """XLA's FLOPs of a compiled train step, per device; with `model.scan_layers`, plus the
  blocks XLA does not see: its cost analysis counts a loop's body once, so the other
  depth - 1 blocks are added, at 3x their forward (4x when remat recomputes everything).
  With `optim.accum_steps` = k, XLA's count is taken k times (the loop over micro-batches;
  the optimizer update outside it, a small part, is counted k times too).

  `batch`: the step's (sharded arrays or ShapeDtypeStructs); its shards give the
  per-device batch, and its mesh the devices that split each block's work (`tensor`).
  """
  # With `optim.accum_steps` the micro-batches are a loop too: its body (the forward and
  # backward of one micro-batch) is nearly all of the step.
  flops = xla_flops(compiled) * config.get("optim", {}).get("accum_steps", 1)
  model = config.get("model")
  if flops and model is not None and model.get("scan_layers"):
    import jax  # pylint: disable=g-import-not-at-top
    from beit_jax.training import sharding  # pylint: disable=g-import-not-at-top
    from beit_jax.models import vit  # pylint: disable=g-import-not-at-top

    leaf = jax.tree.leaves(batch)[0]
    batch_per_device = leaf.sharding.shard_shape(leaf.shape)[0]
    size = vit.size_kwargs(model)
    tokens = (config.input.image_size // size["patch_size"]) ** 2 + 1
    recompute = model.get("remat") and model.get("remat_policy") == "nothing_saveable"
    per_block = (4.0 if recompute else 3.0) * block_forward_flops(size, tokens)
    flops += (
      (size["depth"] - 1)
      * per_block
      * batch_per_device
      / sharding.model_parallel_size(leaf.sharding.mesh)
    )
  return flops


@functools.cache
def peak_flops(dtype: str = "float32", ceiling_size: int = 1024) -> tuple[float | None, str]:
  """(peak FLOP/s per device, where it comes from) for this process's devices.

  A known accelerator: its table entry (dense bf16). CPU: a `dtype` matmul ceiling measured
  now (once per process), divided by the local devices, which share the host's cores (one
  matmul already uses all of them). Otherwise (None, why not).
  """
  import jax  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  known = known_device(device.device_kind)
  if known is not None:
    return known.peak_tflops * 1e12, f"{known.kind}, {known.source}"
  if device.platform == "cpu":
    ceiling = matmul_ceiling(ceiling_size, dtype)
    n = jax.local_device_count()
    return ceiling / n, (
      f"a {ceiling_size}^2 {dtype} matmul measured here, "
      f"{ceiling / 1e9:.1f} GFLOP/s shared by {n} CPU device(s)"
    )
  return None, f"no peak FLOP/s known for device kind {device.device_kind!r}"
